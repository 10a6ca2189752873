//! The one chunk dispatcher: which codec decodes a chunk, and which exact codec encodes one.
//! `make`, `apply`, `verify`, `export` and hot swap all go through here, so a codec is added
//! or changed in one place.

use safetensors::Dtype;

use crate::exact::{self, DecodeError, Scratch};
use crate::layout::{layout, ElementLayout};
use crate::plan::TensorPlan;
use crate::{changes, lossy, ChunkCodec};

/// Decodes one chunk of a tensor of `dtype` from its prediction `pred` into `out` (same
/// length): a `same` chunk is the prediction (its `payload` is ignored), an exact one is
/// decoded by [`decode_exact`], a lossy one by the tensor's codec in `plan`, for the chunk
/// whose first element is element `first` of the tensor.
///
/// The payload is untrusted: any inconsistency is an error, never a panic.
pub fn decode_chunk(
    codec: ChunkCodec,
    dtype: Dtype,
    plan: &TensorPlan,
    first: u64,
    pred: &[u8],
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), DecodeError> {
    match codec {
        ChunkCodec::Same => {
            out.copy_from_slice(pred);
            Ok(())
        }
        ChunkCodec::Exact | ChunkCodec::Changes => decode_exact(codec, layout(dtype), pred, payload, out),
        ChunkCodec::Lossy => {
            let params = plan.chunk_params(first).ok_or(DecodeError("no codec"))?;
            lossy::decode(dtype, &params, pred, payload, out)
        }
    }
}

/// Decodes a chunk of one of the two exact chunk codecs into `out`: `changes`, or (for any
/// other `codec`, which callers keep to `exact`) the dense [`exact`] coder.
pub fn decode_exact(
    codec: ChunkCodec,
    layout: ElementLayout,
    pred: &[u8],
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), exact::DecodeError> {
    match codec {
        ChunkCodec::Changes => changes::decode(layout, pred, payload, out),
        _ => exact::decode(layout, pred, payload, out),
    }
}

/// [`decode_exact`] over the prediction itself: `buf` holds the prediction and ends as the
/// output (on error, its contents are unspecified).
pub fn decode_exact_in_place(
    codec: ChunkCodec,
    layout: ElementLayout,
    payload: &[u8],
    buf: &mut [u8],
) -> Result<(), exact::DecodeError> {
    match codec {
        ChunkCodec::Changes => changes::decode_in_place(layout, payload, buf),
        _ => exact::decode_in_place(layout, payload, buf),
    }
}

/// Encodes a chunk exactly against its prediction, choosing the codec: `same` (no payload)
/// where `target` equals `pred` and `same` is allowed (a new tensor's zeros are no source to
/// point at), `changes` where few elements changed, else the dense `exact` coder. Also
/// returns how many elements differ from the prediction, which every path counts anyway.
pub fn encode_exact_chunk(
    layout: ElementLayout,
    pred: &[u8],
    target: &[u8],
    same: bool,
    scratch: &mut Scratch,
) -> (ChunkCodec, Option<Vec<u8>>, u64) {
    if same && pred == target {
        return (ChunkCodec::Same, None, 0);
    }
    if let Some(changed) = changes::few_changed(layout, pred, target) {
        return (
            ChunkCodec::Changes,
            Some(changes::encode(layout, pred, target)),
            changed,
        );
    }
    let (payload, changed) = exact::encode_counting(layout, pred, target, scratch);
    (ChunkCodec::Exact, Some(payload), changed)
}
