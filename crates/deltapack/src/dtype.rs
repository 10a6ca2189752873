//! Safetensors dtypes: sizes, names and conversions; how the codecs see each one (its element
//! layout) lives in the codec crate and is re-exported here.

use safetensors::Dtype;

pub use deltapack_codec::layout::{layout, ElementLayout};

/// Size in bytes of a tensor of `dtype` and `shape`, or `None` on overflow or a partial byte.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    let bits = numel.checked_mul(dtype.bitsize())?;
    (bits % 8 == 0).then_some(bits / 8)
}

/// Parses a safetensors dtype name ("BF16", "F32", ...).
pub fn parse(name: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
}

/// The safetensors name of a dtype.
pub fn name(dtype: Dtype) -> String {
    dtype.to_string()
}

/// Whether values of `from` can be converted to `to` to serve as a prediction.
pub fn convertible(from: Dtype, to: Dtype) -> bool {
    is_convertible_float(from) && is_convertible_float(to)
}

fn is_convertible_float(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F64)
}

/// Converts little-endian elements of `from` into little-endian elements of `to`, appending to `out`.
///
/// Used only to predict a fine-tune tensor whose dtype differs from the base's; any
/// deterministic conversion would do, this one rounds to nearest-even like PyTorch.
pub fn convert(from: Dtype, to: Dtype, src: &[u8], out: &mut Vec<u8>) {
    let w = from.bitsize() / 8;
    for e in src.chunks_exact(w) {
        let v = match from {
            Dtype::BF16 => half::bf16::from_bits(u16::from_le_bytes([e[0], e[1]])).to_f64(),
            Dtype::F16 => half::f16::from_bits(u16::from_le_bytes([e[0], e[1]])).to_f64(),
            Dtype::F32 => f32::from_le_bytes(e.try_into().expect("4-byte chunk")) as f64,
            _ => f64::from_le_bytes(e.try_into().expect("8-byte chunk")),
        };
        match to {
            Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f64(v).to_bits().to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&half::f16::from_f64(v).to_bits().to_le_bytes()),
            Dtype::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            _ => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in [Dtype::BF16, Dtype::F8_E4M3, Dtype::I64, Dtype::BOOL, Dtype::F4] {
            assert_eq!(parse(&name(d)), Some(d));
        }
        assert_eq!(parse("NOPE"), None);
    }

    #[test]
    fn byte_len_rejects_overflow_and_partial_bytes() {
        assert_eq!(byte_len(Dtype::BF16, &[3, 4]), Some(24));
        assert_eq!(byte_len(Dtype::F32, &[]), Some(4));
        assert_eq!(byte_len(Dtype::F32, &[usize::MAX, 2]), None);
        assert_eq!(byte_len(Dtype::F4, &[3]), None);
        assert_eq!(byte_len(Dtype::F4, &[4]), Some(2));
    }
}
