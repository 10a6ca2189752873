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

/// An element as the codecs see it: a native unsigned integer of its width (u8, u16, u32,
/// u64), so that loops over chunks vectorise. The one element trait of the integer codecs
/// (exact, changes) and hot swap's replay; the lossy codecs' float view is `float::Elem`.
pub(crate) trait Element: Copy {
    /// Bytes per element.
    const WIDTH: usize;
    /// Bits per element.
    const BITS: u32;
    /// The element at the start of `b` (exactly `W` bytes), little-endian.
    fn get(b: &[u8]) -> Self;
    /// Writes the element into `b` (exactly `W` bytes), little-endian.
    fn put(self, b: &mut [u8]);
    /// The element's bits, zero-extended.
    fn bits(self) -> u64;
    /// The element of the low `W` bytes of `v`.
    fn of_bits(v: u64) -> Self;
    /// The codec's order-preserving map of a float's bit pattern (sign-magnitude to offset).
    fn ordered(self) -> Self;
    /// The inverse of [`Element::ordered`].
    fn unordered(self) -> Self;
    /// Wrapping difference.
    fn wrapping_sub(self, o: Self) -> Self;
    /// Wrapping sum.
    fn wrapping_add(self, o: Self) -> Self;

    /// The element at the start of `b` (exactly `WIDTH` bytes), zero-extended.
    #[inline(always)]
    fn load(b: &[u8]) -> u64 {
        Self::get(b).bits()
    }

    /// Writes the low `WIDTH` bytes of `v` into `b` (exactly `WIDTH` bytes).
    #[inline(always)]
    fn store(v: u64, b: &mut [u8]) {
        Self::of_bits(v).put(b)
    }
}

macro_rules! element {
    ($t:ty, $s:ty) => {
        impl Element for $t {
            const WIDTH: usize = std::mem::size_of::<$t>();
            const BITS: u32 = <$t>::BITS;
            #[inline(always)]
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("element width"))
            }
            #[inline(always)]
            fn put(self, b: &mut [u8]) {
                b.copy_from_slice(&self.to_le_bytes());
            }
            #[inline(always)]
            fn bits(self) -> u64 {
                self as u64
            }
            #[inline(always)]
            fn of_bits(v: u64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn ordered(self) -> Self {
                // All ones for a negative value (flip every bit), else the sign bit alone.
                self ^ (((self as $s) >> (<$t>::BITS - 1)) as $t | (1 << (<$t>::BITS - 1)))
            }
            #[inline(always)]
            fn unordered(self) -> Self {
                self ^ (!((self as $s) >> (<$t>::BITS - 1)) as $t | (1 << (<$t>::BITS - 1)))
            }
            #[inline(always)]
            fn wrapping_sub(self, o: Self) -> Self {
                <$t>::wrapping_sub(self, o)
            }
            #[inline(always)]
            fn wrapping_add(self, o: Self) -> Self {
                <$t>::wrapping_add(self, o)
            }
        }
    };
}
element!(u8, i8);
element!(u16, i16);
element!(u32, i32);
element!(u64, i64);
