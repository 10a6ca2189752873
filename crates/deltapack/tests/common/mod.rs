//! Helpers shared by the integration tests: tiny checkpoints written from scratch.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

/// One tensor to write.
pub struct T {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Makes a tensor.
pub fn t(name: &str, dtype: &'static str, shape: &[usize], data: Vec<u8>) -> T {
    T {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

/// Writes a safetensors file the way Hugging Face writers do (header padded to 8 bytes).
pub fn write_st(path: &Path, tensors: &[T]) {
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0;
    for x in tensors {
        header.push_str(&format!(
            r#","{}":{{"dtype":"{}","shape":{:?},"data_offsets":[{},{}]}}"#,
            x.name,
            x.dtype,
            x.shape,
            offset,
            offset + x.data.len()
        ));
        offset += x.data.len();
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for x in tensors {
        bytes.extend_from_slice(&x.data);
    }
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// bf16 weights near N(0, 0.02) and a fine-tune that moves some by a few ULPs.
pub fn bf16_pair(seed: u64, n: usize) -> (Vec<u8>, Vec<u8>) {
    let r = noise(seed, n * 3);
    let mut base = Vec::with_capacity(2 * n);
    let mut ft = Vec::with_capacity(2 * n);
    for i in 0..n {
        let v = (r[3 * i] as f32 - 127.5) / 127.5 * 0.04;
        let b = half::bf16::from_f32(v).to_bits();
        let step = [0i16, 0, 0, 1, -1, 2, 0, -3][(r[3 * i + 1] % 8) as usize];
        let f = (b as i16).wrapping_add(step) as u16;
        base.extend_from_slice(&b.to_le_bytes());
        ft.extend_from_slice(&f.to_le_bytes());
    }
    (base, ft)
}

/// Every file below `dir`, by relative path.
pub fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A small base/fine-tune pair of directories with config and tokenizer files.
pub fn small_pair(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (base, ft) = (root.join("base"), root.join("ft"));
    let (b1, f1) = bf16_pair(1, 3000);
    let (b2, _) = bf16_pair(2, 64);
    write_st(
        &base.join("model.safetensors"),
        &[t("w", "BF16", &[100, 30], b1), t("b", "BF16", &[64], b2.clone())],
    );
    write_st(
        &ft.join("model.safetensors"),
        &[t("w", "BF16", &[100, 30], f1), t("b", "BF16", &[64], b2)],
    );
    for d in [&base, &ft] {
        std::fs::write(d.join("config.json"), br#"{"hidden_size": 30}"#).unwrap();
    }
    std::fs::write(base.join("tokenizer.json"), br#"{"vocab": ["a", "b"]}"#).unwrap();
    std::fs::write(ft.join("tokenizer.json"), br#"{"vocab": ["a", "b", "c"]}"#).unwrap();
    (base, ft)
}

/// Rewrites a delta's index through `edit`, with valid checksums, so only validation can object.
pub fn with_index(path: &Path, out: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    let word = |i: usize| u64::from_le_bytes(bytes[n - 64 + 8 * i..n - 56 + 8 * i].try_into().unwrap()) as usize;
    let (offset, len, raw) = (word(0), word(1), word(2));
    let json = zstd::bulk::decompress(&bytes[offset..offset + len], raw).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    edit(&mut v);
    let json = serde_json::to_vec(&v).unwrap();
    let packed = zstd::bulk::compress(&json, 3).unwrap();
    let mut new = bytes[..offset].to_vec();
    new.extend_from_slice(&packed);
    new.extend_from_slice(&(offset as u64).to_le_bytes());
    new.extend_from_slice(&(packed.len() as u64).to_le_bytes());
    new.extend_from_slice(&(json.len() as u64).to_le_bytes());
    new.extend_from_slice(blake3::hash(&packed).as_bytes());
    new.extend_from_slice(b"DPKINDEX");
    std::fs::write(out, new).unwrap();
}
