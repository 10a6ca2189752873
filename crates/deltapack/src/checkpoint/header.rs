//! Parsing and validation of a safetensors header.
//!
//! The header is untrusted: we let the `safetensors` crate validate it (dtype names, offsets
//! that tile the data section exactly, byte lengths equal to shape x dtype size) and add the
//! checks it leaves to the caller (the file length).

use safetensors::tensor::Metadata;
use safetensors::Dtype;

/// Largest header accepted, as in the safetensors crate.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor as a safetensors header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Byte range within the data section (after the header).
    pub data_offsets: (usize, usize),
}

/// A parsed header: its length and the tensors sorted by data offset.
#[derive(Debug, Clone)]
pub struct Header {
    /// Length of the JSON header in bytes (the file's first 8 bytes say so).
    pub json_len: u64,
    /// Length of the data section the header describes.
    pub data_len: u64,
    /// Tensors in data-offset order.
    pub tensors: Vec<TensorInfo>,
}

impl Header {
    /// Bytes before the data section: the 8-byte length plus the JSON.
    pub fn prefix_len(&self) -> u64 {
        8 + self.json_len
    }
}

/// The safetensors header (the 8-byte length and the JSON) for tensors stored in this order, with `metadata` as its
/// `__metadata__`, padded with spaces to 8 bytes as Hugging Face writers do; and the length
/// of the data it describes.
pub fn build(
    metadata: Option<serde_json::Value>,
    tensors: &[(&str, Dtype, &[usize])],
) -> crate::Result<(Vec<u8>, u64)> {
    let mut json = serde_json::Map::new();
    if let Some(m) = metadata {
        json.insert("__metadata__".into(), m);
    }
    let mut offset = 0u64;
    for &(name, dt, shape) in tensors {
        let len = crate::dtype::byte_len(dt, shape)
            .ok_or_else(|| crate::Error::InvalidArgument(format!("tensor '{name}' of shape {shape:?} is too large")))?;
        let end = offset + len as u64;
        let entry = serde_json::json!({"dtype": crate::dtype::name(dt), "shape": shape, "data_offsets": [offset, end]});
        json.insert(name.to_string(), entry);
        offset = end;
    }
    let mut text = serde_json::to_string(&json).expect("a JSON map serializes");
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    Ok((bytes, offset))
}

/// The dtype a safetensors header names `name` ("BF16", "F32", ...), if it is one.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    crate::dtype::parse(name)
}

/// Reads the 8-byte header length from the start of a file.
pub fn json_len(prefix: &[u8]) -> Result<u64, String> {
    let Some(n) = prefix.get(..8) else {
        return Err("file is shorter than the 8-byte safetensors header length".into());
    };
    let n = u64::from_le_bytes(n.try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte limit"));
    }
    Ok(n)
}

/// Parses and validates a header given the file's first bytes (at least `8 + json_len`)
/// and, if known, the total file length.
pub fn parse(prefix: &[u8], file_len: Option<u64>) -> Result<Header, String> {
    let n = json_len(prefix)?;
    let json = prefix
        .get(8..8 + n as usize)
        .ok_or_else(|| format!("file ends inside its {n}-byte header"))?;
    let text = std::str::from_utf8(json).map_err(|e| format!("header is not UTF-8: {e}"))?;
    let meta: Metadata = serde_json::from_str(text).map_err(|e| format!("invalid header: {e}"))?;
    let data_len = meta.data_len() as u64;
    if let Some(len) = file_len {
        if 8 + n + data_len != len {
            return Err(format!(
                "header describes {} bytes of data but the file holds {}; the file is truncated or padded",
                data_len,
                len.saturating_sub(8 + n)
            ));
        }
    }
    let tensors = meta
        .offset_keys()
        .into_iter()
        .map(|name| {
            let info = meta.info(&name).expect("offset_keys names are in the metadata");
            TensorInfo {
                dtype: info.dtype,
                shape: info.shape.clone(),
                data_offsets: info.data_offsets,
                name,
            }
        })
        .collect();
    Ok(Header {
        json_len: n,
        data_len,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    #[test]
    fn parses_and_sorts_by_offset() {
        let f = file(
            r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#,
            12,
        );
        let h = parse(&f, Some(f.len() as u64)).unwrap();
        assert_eq!(
            h.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(h.data_len, 12);
    }

    #[test]
    fn rejects_bad_headers() {
        let gap = file(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 8);
        assert!(parse(&gap, Some(gap.len() as u64)).is_err());
        let wrong_len = file(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8);
        assert!(parse(&wrong_len, Some(wrong_len.len() as u64)).is_err());
        let ok = file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 8);
        assert!(parse(&ok, Some(ok.len() as u64 - 1)).is_err(), "truncated file");
        assert!(parse(&ok[..20], None).is_err(), "truncated header");
        assert!(parse(&[0xFF; 8], None).is_err(), "huge length");
        let dtype = file(r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#, 8);
        assert!(parse(&dtype, None).is_err());
    }
}
