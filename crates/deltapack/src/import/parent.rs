//! Checking a base against the `parent_hash` of a `.wdelta`.
//!
//! deltatensors 0.2.0 hashes, for each tensor the delta covers, its UTF-8 name followed by
//! the bytes of the array it was handed (`hash_state_dict`, and the paths API's equivalent).
//! Those bytes depend on how the caller built the arrays, so a base is accepted if any of
//! the forms its users can give matches:
//!
//! - as stored, names sorted: numpy arrays of the checkpoint, and `save_delta_from_paths`
//!   on a one-file base (which hashes bf16 as its 16-bit pattern);
//! - every tensor as float32, names sorted: `{k: v.float().numpy()}`, the usual way to hand
//!   a torch state dict to numpy, which has no bfloat16;
//! - bf16 tensors as float32 and the others as stored, names sorted;
//! - as stored, in `load_delta_from_paths`' shard order, for a sharded base: shards in the
//!   order the header first names one of their tensors, names sorted within a shard.

use sha2::{Digest, Sha256};

use super::{convert, Wdelta};
use crate::checkpoint::{Checkpoint, TensorRef};
use crate::progress::Progress;
use crate::{Error, Result};
use safetensors::Dtype;

/// How a tensor's bytes are hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Stored,
    Float32,
    Bf16AsFloat32,
}

impl Form {
    fn widens(self, dtype: Dtype) -> bool {
        match self {
            Form::Stored => false,
            Form::Float32 => dtype != Dtype::F32,
            Form::Bf16AsFloat32 => dtype == Dtype::BF16,
        }
    }
}

/// Fails unless the base hashes to the `.wdelta`'s `parent_hash` in one of the forms above.
pub fn check(w: &Wdelta, base: &Checkpoint, progress: &dyn Progress) -> Result<()> {
    let header_order: Vec<&TensorRef> = w
        .layout
        .tensors
        .iter()
        .map(|t| base.tensor(&t.name).expect("match_base found every tensor"))
        .collect();
    let mut sorted = header_order.clone();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut forms = vec![Form::Stored];
    for f in [Form::Float32, Form::Bf16AsFloat32] {
        let differs = |g: &Form| sorted.iter().any(|t| f.widens(t.dtype) != g.widens(t.dtype));
        if forms.iter().all(differs) {
            forms.push(f);
        }
    }
    let mut orders = vec![(sorted, forms)];
    let sharded = shard_order(&header_order);
    if sharded.iter().map(|t| &t.name).ne(orders[0].0.iter().map(|t| &t.name)) {
        orders.push((sharded, vec![Form::Stored]));
    }
    let total: u64 = orders
        .iter()
        .map(|(ts, forms)| forms.len() as u64 * ts.iter().map(|t| t.len() as u64).sum::<u64>())
        .sum();
    progress.begin("base hash", total);
    let found = orders
        .iter()
        .any(|(ts, forms)| hashes(base, ts, forms, progress).contains(&w.layout.parent_hash));
    progress.finish();
    if found {
        return Ok(());
    }
    Err(Error::WrongParentHash {
        path: base.root.clone(),
        wdelta: w.path.clone(),
        expected: w.layout.parent_hash.clone(),
    })
}

/// Shards in the order `tensors` first names one of theirs; names sorted within a shard.
fn shard_order<'a>(tensors: &[&'a TensorRef]) -> Vec<&'a TensorRef> {
    let mut rank = std::collections::HashMap::new();
    for t in tensors {
        let next = rank.len();
        rank.entry(t.shard).or_insert(next);
    }
    let mut out = tensors.to_vec();
    out.sort_by(|a, b| (rank[&a.shard], &a.name).cmp(&(rank[&b.shard], &b.name)));
    out
}

/// The lowercase hex SHA-256 of `tensors` in each form, read in one pass.
fn hashes(base: &Checkpoint, tensors: &[&TensorRef], forms: &[Form], progress: &dyn Progress) -> Vec<String> {
    let mut hashers = vec![Sha256::new(); forms.len()];
    let mut wide = Vec::new();
    for t in tensors {
        for h in &mut hashers {
            h.update(t.name.as_bytes());
        }
        let bytes = base.bytes(t);
        let width = t.dtype.bitsize() / 8;
        for (k, piece) in bytes.chunks(width << 16).enumerate() {
            wide.clear();
            for (h, f) in hashers.iter_mut().zip(forms) {
                if !f.widens(t.dtype) {
                    h.update(piece);
                    continue;
                }
                if wide.is_empty() {
                    for e in piece.chunks_exact(width) {
                        wide.extend_from_slice(&convert::to_f32(t.dtype, e).to_le_bytes());
                    }
                }
                h.update(&wide);
            }
            progress.advance((piece.len() * forms.len()) as u64);
            let start = k * (width << 16);
            base.release(t, start..start + piece.len());
        }
    }
    hashers
        .into_iter()
        .map(|h| crate::hash::hex(&h.finalize().into()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shard: usize) -> TensorRef {
        TensorRef {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![1],
            shard,
            data_offsets: (0, 4),
        }
    }

    #[test]
    fn shard_order_follows_first_appearance_then_names() {
        let ts = [t("a", 1), t("b", 0), t("c", 1), t("d", 0)];
        let refs: Vec<&TensorRef> = ts.iter().collect();
        let names: Vec<&str> = shard_order(&refs).iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "c", "b", "d"]);
    }
}
