//! Base elements as float32, and float32 results stored back in the base's dtype, the way
//! numpy and PyTorch convert.

use safetensors::Dtype;

/// Whether a base tensor of `dtype` can be imported: floats of 16 bits or more and integers.
pub fn supported(dtype: Dtype) -> bool {
    use Dtype::*;
    matches!(
        dtype,
        BF16 | F16 | F32 | F64 | I8 | I16 | I32 | I64 | U8 | U16 | U32 | U64
    )
}

/// One little-endian element of a [`supported`] dtype as float32, like numpy's
/// `astype(float32)` and torch's `.to(float32)`: exact for 16-bit floats, rounded to
/// nearest-even for wider values.
pub fn to_f32(dtype: Dtype, e: &[u8]) -> f32 {
    let b = |n: usize| -> [u8; 8] {
        let mut a = [0; 8];
        a[..n].copy_from_slice(&e[..n]);
        a
    };
    match dtype {
        Dtype::BF16 => half::bf16::from_bits(u16::from_le_bytes([e[0], e[1]])).to_f32(),
        Dtype::F16 => half::f16::from_bits(u16::from_le_bytes([e[0], e[1]])).to_f32(),
        Dtype::F32 => f32::from_le_bytes([e[0], e[1], e[2], e[3]]),
        Dtype::F64 => f64::from_le_bytes(b(8)) as f32,
        Dtype::I8 => e[0] as i8 as f32,
        Dtype::I16 => i16::from_le_bytes([e[0], e[1]]) as f32,
        Dtype::I32 => i32::from_le_bytes([e[0], e[1], e[2], e[3]]) as f32,
        Dtype::I64 => i64::from_le_bytes(b(8)) as f32,
        Dtype::U8 => e[0] as f32,
        Dtype::U16 => u16::from_le_bytes([e[0], e[1]]) as f32,
        Dtype::U32 => u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as f32,
        _ => u64::from_le_bytes(b(8)) as f32,
    }
}

/// Appends `v` as one little-endian element of a [`supported`] dtype.
///
/// bf16 and f16 round to nearest-even (PyTorch's and numpy's casts; NaN stays NaN, its
/// payload bits are not preserved). Integers truncate toward zero as numpy's `astype`
/// does; a NaN, infinite or out-of-range value is an error, where numpy's result would be
/// platform-defined.
pub fn store(dtype: Dtype, v: f32, out: &mut Vec<u8>) -> Result<(), String> {
    match dtype {
        Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
        Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
        Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
        Dtype::F64 => out.extend_from_slice(&f64::from(v).to_le_bytes()),
        _ => store_int(dtype, v, out)?,
    }
    Ok(())
}

fn store_int(dtype: Dtype, v: f32, out: &mut Vec<u8>) -> Result<(), String> {
    let misfit = || format!("the rebuilt value {v} does not fit the base tensor's dtype {dtype}");
    if !v.is_finite() {
        return Err(misfit());
    }
    // Saturates for |v| beyond i128, which no integer dtype holds either.
    let i = v.trunc() as i128;
    let fit = |r: Result<(), std::num::TryFromIntError>| r.map_err(|_| misfit());
    match dtype {
        Dtype::I8 => fit(i8::try_from(i).map(|x| out.extend_from_slice(&x.to_le_bytes()))),
        Dtype::I16 => fit(i16::try_from(i).map(|x| out.extend_from_slice(&x.to_le_bytes()))),
        Dtype::I32 => fit(i32::try_from(i).map(|x| out.extend_from_slice(&x.to_le_bytes()))),
        Dtype::I64 => fit(i64::try_from(i).map(|x| out.extend_from_slice(&x.to_le_bytes()))),
        Dtype::U8 => fit(u8::try_from(i).map(|x| out.extend_from_slice(&x.to_le_bytes()))),
        Dtype::U16 => fit(u16::try_from(i).map(|x| out.extend_from_slice(&x.to_le_bytes()))),
        Dtype::U32 => fit(u32::try_from(i).map(|x| out.extend_from_slice(&x.to_le_bytes()))),
        Dtype::U64 => fit(u64::try_from(i).map(|x| out.extend_from_slice(&x.to_le_bytes()))),
        _ => Err(format!("dtype {dtype} cannot hold the rebuilt values")),
    }
}

/// Appends `base + delta` (elementwise, in float32, as deltatensors' loader adds them),
/// stored in `dtype`, for the little-endian `base` elements.
pub fn add_and_store(dtype: Dtype, base: &[u8], delta: &[f32], out: &mut Vec<u8>) -> Result<(), String> {
    let width = dtype.bitsize() / 8;
    for (e, &d) in base.chunks_exact(width).zip(delta) {
        store(dtype, to_f32(dtype, e) + d, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(dtype: Dtype, v: f32) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        store(dtype, v, &mut out).map(|_| out)
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even mantissa (1.0);
        // a hair above rounds up.
        let halfway = f32::from_bits(0x3F80_8000);
        assert_eq!(stored(Dtype::BF16, halfway).unwrap(), 0x3F80u16.to_le_bytes());
        let above = f32::from_bits(0x3F80_8001);
        assert_eq!(stored(Dtype::BF16, above).unwrap(), 0x3F81u16.to_le_bytes());
        let odd_halfway = f32::from_bits(0x3F81_8000);
        assert_eq!(stored(Dtype::BF16, odd_halfway).unwrap(), 0x3F82u16.to_le_bytes());
        assert_eq!(stored(Dtype::BF16, f32::MAX).unwrap(), 0x7F80u16.to_le_bytes());
    }

    #[test]
    fn f16_rounds_to_nearest_even_and_overflows_to_infinity() {
        assert_eq!(
            stored(Dtype::F16, 1.0 + 2f32.powi(-11)).unwrap(),
            0x3C00u16.to_le_bytes()
        );
        assert_eq!(stored(Dtype::F16, 70000.0).unwrap(), 0x7C00u16.to_le_bytes());
    }

    #[test]
    fn integers_truncate_toward_zero_and_refuse_what_does_not_fit() {
        assert_eq!(stored(Dtype::I64, -2.9).unwrap(), (-2i64).to_le_bytes());
        assert_eq!(stored(Dtype::U8, 255.5).unwrap(), [255]);
        assert!(stored(Dtype::U8, 256.0).is_err());
        assert!(stored(Dtype::U8, -1.0).is_err());
        assert!(stored(Dtype::I32, f32::NAN).is_err());
        assert!(stored(Dtype::I64, 9.3e18).is_err());
        assert!(stored(Dtype::BOOL, 1.0).is_err());
    }

    #[test]
    fn wide_values_round_to_float32() {
        let v = 1.0f64 + 2f64.powi(-30);
        assert_eq!(to_f32(Dtype::F64, &v.to_le_bytes()), 1.0);
        assert_eq!(to_f32(Dtype::I64, &(16_777_217i64).to_le_bytes()), 16_777_216.0);
        assert_eq!(to_f32(Dtype::BF16, &0xC040u16.to_le_bytes()), -3.0);
    }

    #[test]
    fn adding_a_zero_delta_turns_negative_zero_positive_as_numpy_does() {
        let mut out = Vec::new();
        add_and_store(Dtype::BF16, &0x8000u16.to_le_bytes(), &[0.0], &mut out).unwrap();
        assert_eq!(out, 0u16.to_le_bytes());
    }
}
