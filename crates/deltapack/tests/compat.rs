//! Format compatibility: deltas written by commit 6915cbf (format 1.3), one per codec plus a
//! chain link, still apply to the same bytes that commit rebuilt, and `make` still writes
//! the bytes it wrote. The fixtures and the hashes of 6915cbf's `apply` output are made by
//! `scripts/make_compat_fixtures.py` (see `tests/data/compat/README.md`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use deltapack::container::Delta;
use deltapack::progress::NoProgress;
use deltapack::tune::{CodecPolicy, CodecSpec};
use deltapack::{apply_chain, make, ApplyOptions, MakeOptions};
use sha2::{Digest, Sha256};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/compat")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every file below `root`, relative path -> sha256 hex.
fn tree_hashes(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let digest = Sha256::digest(std::fs::read(&p).unwrap());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            out.insert(rel, hex);
        }
    }
    out
}

#[test]
fn deltas_written_by_6915cbf_apply_byte_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = expected()["fixtures"].as_object().unwrap().clone();
    assert!(fixtures.len() >= 10, "every codec and a chain link");
    for (name, f) in fixtures {
        let chain: Vec<PathBuf> = f["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| dir().join(c.as_str().unwrap()))
            .collect();
        let out = tmp.path().join(&name);
        apply_chain(&dir().join("base"), &chain, &out, &ApplyOptions::default(), &NoProgress)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want: BTreeMap<String, String> = serde_json::from_value(f["rebuilt_sha256"].clone()).unwrap();
        assert_eq!(tree_hashes(&out), want, "{name} rebuilds other bytes than 6915cbf did");
    }
}

/// The options `make` took for a fixture, from the command-line arguments recorded for it.
fn options(args: &[String]) -> MakeOptions {
    let mut opts = MakeOptions {
        chunk_bytes: 4096,
        base_id: Some("fixtures/compat@6915cbf".into()),
        ..Default::default()
    };
    let mut spec = CodecSpec::Exact;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--self-contained" => opts.self_contained = true,
            "--codec" => spec = it.next().unwrap().parse().unwrap(),
            "--max-error" => opts.codecs.max_error = Some(it.next().unwrap().parse().unwrap()),
            flag => {
                let key = flag.strip_prefix("--").unwrap();
                spec.set(key, it.next().unwrap()).unwrap();
            }
        }
    }
    opts.codecs = CodecPolicy {
        default: spec,
        ..opts.codecs
    };
    opts
}

/// The payload region (after the fixed header, whose minor version is the writer's) and the
/// index (as JSON, without `created_by` and the tensors' 1.4 `changed` counts, which 6915cbf
/// did not write) of a delta file.
fn content(path: &Path) -> (Vec<u8>, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap();
    let trailer = &bytes[bytes.len() - 64..];
    let index_offset = u64::from_le_bytes(trailer[..8].try_into().unwrap()) as usize;
    let delta = Delta::open(path).unwrap();
    let mut index = serde_json::to_value(&delta.index).unwrap();
    index.as_object_mut().unwrap().remove("created_by");
    for file in index["files"].as_array_mut().unwrap() {
        for t in file["tensors"].as_array_mut().unwrap() {
            t.as_object_mut().unwrap().remove("changed");
        }
    }
    (
        bytes[deltapack::container::HEADER_LEN as usize..index_offset].to_vec(),
        index,
    )
}

#[test]
fn make_writes_the_bytes_6915cbf_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = expected()["fixtures"].as_object().unwrap().clone();
    for (name, f) in fixtures {
        let Some(args) = f["make"].as_array() else {
            continue; // the chain link: made with --parent, checked by applying it
        };
        let args: Vec<String> = args.iter().map(|a| a.as_str().unwrap().to_string()).collect();
        if !args.iter().any(|a| a == "--self-contained") {
            // The default codes shard headers without the base's files since issue 15, so
            // only its tensors, checked by applying, are 6915cbf's.
            continue;
        }
        let out = tmp.path().join(&name);
        let ft = dir().join("finetuned");
        make(&dir().join("base"), &ft, &out, &options(&args), &NoProgress).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (payload, index) = content(&out);
        let (want_payload, want_index) = content(&dir().join(&name));
        assert_eq!(index, want_index, "{name}: the index differs from 6915cbf's");
        assert!(payload == want_payload, "{name}: the payload differs from 6915cbf's");
    }
}
