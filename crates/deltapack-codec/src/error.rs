//! Why a payload does not decode, and the end-of-chunk checks every decoder shares: below the
//! codecs and their kernels, so that neither imports the other for them.

/// Why a chunk payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

/// The end-of-chunk checks, shared by the scalar and vector decoders.
#[inline]
pub(crate) fn verdict(bad_context: bool, consumed_exactly: bool) -> Result<(), DecodeError> {
    if bad_context {
        return Err(DecodeError("element in a context with no table"));
    }
    if !consumed_exactly {
        return Err(DecodeError("payload length does not match its content"));
    }
    Ok(())
}
