//! Pairing fine-tune tensors with the base tensors that predict them.

use std::ops::Range;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, TensorRef};
use crate::dtype;

/// How a fine-tune tensor relates to the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Relation {
    /// Same name, dtype and shape as a base tensor (it may or may not have changed).
    Direct,
    /// Same name and dtype, first dimension changed (vocabulary resize): the common rows are
    /// coded as a delta, added rows against zero.
    Resized,
    /// Same name and shape, another float dtype: coded against the base converted to this dtype.
    Converted,
    /// Only in the fine-tune, but the base ties it to another tensor (an untied `lm_head`):
    /// coded against that tensor.
    Tied,
    /// No usable base counterpart: coded on its own.
    New,
}

/// The pairing of one fine-tune tensor.
#[derive(Debug, Clone)]
pub struct Pairing {
    /// Index into the fine-tune checkpoint's tensors.
    pub target: usize,
    /// How it relates to its source.
    pub relation: Relation,
    /// Index into the base checkpoint's tensors, unless `relation` is `New`.
    pub source: Option<usize>,
}

/// The full plan: every fine-tune tensor paired, and the base tensors nobody uses.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One entry per fine-tune tensor, in fine-tune order.
    pub pairings: Vec<Pairing>,
    /// Base tensors absent from the fine-tune (by index into the base's tensors).
    pub removed: Vec<usize>,
}

/// Names under which checkpoints keep the input embedding that an output head may be tied to.
const TIE_TARGETS: [&str; 8] = [
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
    "embeddings.weight",
    "token_embd.weight",
];

/// Decides how each fine-tune tensor is coded.
pub fn plan(base: &Checkpoint, ft: &Checkpoint) -> Plan {
    let pairings = ft
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let (relation, source) = pair_one(base, t);
            Pairing {
                target: i,
                relation,
                source,
            }
        })
        .collect();
    let removed = base
        .tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| ft.tensor(&t.name).is_none())
        .map(|(i, _)| i)
        .collect();
    Plan { pairings, removed }
}

fn pair_one(base: &Checkpoint, t: &TensorRef) -> (Relation, Option<usize>) {
    if let Some(b) = base.tensor(&t.name) {
        if let Some(rel) = relation(b.dtype, &b.shape, t.dtype, &t.shape) {
            return (rel, base.index_of(&t.name));
        }
        return (Relation::New, None);
    }
    if t.name == "lm_head.weight" || t.name.ends_with(".lm_head.weight") || t.name.ends_with("output.weight") {
        for b in &base.tensors {
            let tied = TIE_TARGETS
                .iter()
                .any(|s| b.name == *s || b.name.ends_with(&format!(".{s}")));
            if tied
                && matches!(
                    relation(b.dtype, &b.shape, t.dtype, &t.shape),
                    Some(Relation::Direct | Relation::Resized)
                )
            {
                return (Relation::Tied, base.index_of(&b.name));
            }
        }
    }
    (Relation::New, None)
}

/// The relation between a source of `(sd, ss)` and a target of `(td, ts)`, if one is usable.
pub fn relation(sd: Dtype, ss: &[usize], td: Dtype, ts: &[usize]) -> Option<Relation> {
    if sd == td && ss == ts {
        return Some(Relation::Direct);
    }
    if sd == td && !ss.is_empty() && ss.len() == ts.len() && ss[1..] == ts[1..] {
        return Some(Relation::Resized);
    }
    if ss == ts && dtype::convertible(sd, td) {
        return Some(Relation::Converted);
    }
    None
}

/// The bytes of a source of dtype `sd` (`src_len` bytes long) that predict bytes `range` of a
/// target of dtype `td` under `relation` (empty for `New`).
pub fn source_range(relation: Relation, sd: Dtype, td: Dtype, range: Range<usize>, src_len: usize) -> Range<usize> {
    match relation {
        Relation::New => 0..0,
        Relation::Converted => {
            let (tw, sw) = (td.bitsize() / 8, sd.bitsize() / 8);
            range.start / tw * sw..range.end / tw * sw
        }
        Relation::Direct | Relation::Resized | Relation::Tied => range.start.min(src_len)..range.end.min(src_len),
    }
}

/// Fills `buf` with the prediction for bytes `range` of a target tensor of dtype `td`
/// from `source` bytes of dtype `sd` under `relation`, or returns the source slice itself
/// when no copy is needed.
pub fn predict<'a>(
    relation: Relation,
    sd: Dtype,
    td: Dtype,
    source: &'a [u8],
    range: Range<usize>,
    buf: &'a mut Vec<u8>,
) -> &'a [u8] {
    predict_window(relation, sd, td, source, 0, source.len(), range, buf)
}

/// [`predict`] from a stretch of the source: `window` holds its bytes from `offset` on,
/// of a source `src_len` bytes long, and must cover what the prediction reads.
#[allow(clippy::too_many_arguments)]
pub fn predict_window<'a>(
    relation: Relation,
    sd: Dtype,
    td: Dtype,
    window: &'a [u8],
    offset: usize,
    src_len: usize,
    range: Range<usize>,
    buf: &'a mut Vec<u8>,
) -> &'a [u8] {
    buf.clear();
    let read = source_range(relation, sd, td, range.clone(), src_len);
    let src = &window[read.start.saturating_sub(offset).min(window.len())..][..read.len()];
    match relation {
        Relation::Converted => dtype::convert(sd, td, src, buf),
        _ if src.len() == range.len() => return src,
        // Rows the source lacks (a grown vocabulary, or a new tensor) are predicted as zeros.
        _ => {
            buf.extend_from_slice(src);
            buf.resize(range.len(), 0);
        }
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relations() {
        use Dtype::*;
        assert_eq!(relation(BF16, &[4, 2], BF16, &[4, 2]), Some(Relation::Direct));
        assert_eq!(relation(BF16, &[4, 2], BF16, &[6, 2]), Some(Relation::Resized));
        assert_eq!(relation(BF16, &[4, 2], BF16, &[4, 3]), None);
        assert_eq!(relation(F32, &[4, 2], BF16, &[4, 2]), Some(Relation::Converted));
        assert_eq!(relation(I64, &[4], F32, &[4]), None);
        assert_eq!(relation(F32, &[], F32, &[]), Some(Relation::Direct));
    }

    #[test]
    fn predictions() {
        let src: Vec<u8> = (0..8).collect();
        let mut buf = Vec::new();
        assert_eq!(
            predict(Relation::Resized, Dtype::U8, Dtype::U8, &src, 6..10, &mut buf),
            &[6, 7, 0, 0]
        );
        assert_eq!(
            predict(Relation::New, Dtype::U8, Dtype::U8, &src, 0..3, &mut buf),
            &[0, 0, 0]
        );
        let f32s: Vec<u8> = [1.0f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let p = predict(Relation::Converted, Dtype::F32, Dtype::BF16, &f32s, 2..4, &mut buf).to_vec();
        assert_eq!(p, half::bf16::from_f32(-2.0).to_bits().to_le_bytes());
    }
}
