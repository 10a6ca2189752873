//! How the codecs see each safetensors dtype: element width and float layout.

use safetensors::Dtype;

/// The view of a dtype that the codecs need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElementLayout {
    /// Bytes per coded element (1, 2, 4 or 8).
    pub width: usize,
    /// For sign-magnitude floats: number of mantissa bits, so the exponent is `(bits >> mant) & exp_mask`.
    pub float: Option<FloatLayout>,
}

/// Bit layout of a sign-magnitude float format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloatLayout {
    /// Mantissa bits.
    pub mantissa_bits: u32,
    /// Exponent mask after shifting out the mantissa.
    pub exponent_mask: u32,
}

impl FloatLayout {
    /// The bits of the exponent field, in place.
    #[inline]
    pub fn exponent_field(self) -> u64 {
        (self.exponent_mask as u64) << self.mantissa_bits
    }
}

const fn float(mantissa_bits: u32, exponent_bits: u32) -> Option<FloatLayout> {
    Some(FloatLayout {
        mantissa_bits,
        exponent_mask: (1 << exponent_bits) - 1,
    })
}

/// Returns how a dtype is coded.
///
/// Sign-magnitude floats get their exponent as context and an order-preserving integer
/// difference; integers a wrapping difference. Dtypes that pack several values per byte
/// (F4, F6) and any future dtype are coded as raw bytes: still exact, merely less compact.
// Inline: called per chunk from the engine crate, where the match folds for a known dtype.
#[inline]
pub fn layout(dtype: Dtype) -> ElementLayout {
    let (width, float) = match dtype {
        Dtype::BF16 => (2, float(7, 8)),
        Dtype::F16 => (2, float(10, 5)),
        Dtype::F32 | Dtype::C64 => (4, float(23, 8)),
        Dtype::F64 => (8, float(52, 11)),
        Dtype::F8_E4M3 | Dtype::F8_E4M3FNUZ => (1, float(3, 4)),
        Dtype::F8_E5M2 | Dtype::F8_E5M2FNUZ => (1, float(2, 5)),
        Dtype::I16 | Dtype::U16 => (2, None),
        Dtype::I32 | Dtype::U32 => (4, None),
        Dtype::I64 | Dtype::U64 => (8, None),
        // BOOL, U8, I8, F8_E8M0 (unsigned exponent-only), packed F4/F6 and unknown dtypes.
        _ => (1, None),
    };
    ElementLayout { width, float }
}
