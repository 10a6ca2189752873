//! Planning a switch: which resident tensor each tensor of a delta rewrites, checked against
//! the fingerprints the delta records, before anything changes.

use std::collections::BTreeSet;

use rayon::prelude::*;

use crate::apply::plan_of;
use crate::container::index::SourceTensor;
use crate::container::Delta;
use crate::dtype;
use crate::hash;
use crate::pair::Relation;
use crate::{BasePart, Error, Result};

use super::*;

impl Resident {
    /// Matches every tensor of a delta continuing the last link with the tensor of the model
    /// it continues, checking it against the fingerprint the delta records: tensors it
    /// changes are rewritten in place, the others kept as they are.
    pub(super) fn plan_link<'d>(&self, d: &'d Delta) -> Result<Vec<Planned<'d>>> {
        let top = self.active.last().expect("a link to continue");
        let cb = d.index.chunk_bytes as usize;
        let unsupported = |tensor: &str, what: &str| {
            Error::InvalidArgument(format!(
                "{}: tensor '{tensor}' {what}; hot swap continues a chain only with links that \
                 keep every tensor and rewrite base tensors in place, in their dtype (resizing at \
                 most the first dimension), at the first link's chunk size: rebuild this chain \
                 with `deltapack apply`, or switch to a delta of the fine-tune against the base",
                d.path.display()
            ))
        };
        if cb != top.chunk_bytes() {
            let what = format!(
                "is coded in chunks of {cb} bytes, its chain's first link in chunks of {}",
                top.chunk_bytes()
            );
            return Err(unsupported("*", &what));
        }
        let names: BTreeSet<&str> = d.index.tensors().map(|t| t.name.as_str()).collect();
        if let Some(v) = top.view.iter().find(|v| !names.contains(v.name.as_str())) {
            return Err(unsupported(&v.name, "is not in it (a link that removes tensors)"));
        }
        let mut planned = Vec::new();
        for t in d.index.tensors() {
            let dtype = dtype::parse(&t.dtype).expect("validated dtype");
            let shape: Vec<usize> = t.shape.iter().map(|&x| x as usize).collect();
            let v = top
                .by_name
                .get(&t.name)
                .map(|&v| &top.view[v])
                .ok_or_else(|| unsupported(&t.name, "is new (a link that adds tensors)"))?;
            // In place: the same tensor, or the same with its first dimension resized.
            let fits = match t.relation {
                Relation::Direct => v.shape == shape,
                Relation::Resized => true,
                _ => false,
            };
            let source = t.source.as_ref().filter(|s| {
                let same_shape = s.shape.iter().map(|&x| x as usize).eq(v.shape.iter().copied());
                s.name == t.name && fits && v.dtype == dtype && same_shape
            });
            let Some(s) = source else {
                return Err(unsupported(&t.name, "changes dtype or name"));
            };
            let now = match v.place {
                Place::Base(i) => self.print_now(i, cb),
                Place::Fresh { link, j } => self.active[link].fresh_prints[j].clone(),
            };
            if now != s.hash {
                return Err(Error::WrongParent {
                    path: d.path.clone(),
                    reason: format!(
                        "tensor '{}' of the model it continues has different values (fingerprint mismatch)",
                        t.name
                    ),
                });
            }
            if t.unchanged() {
                continue;
            }
            let i = match v.place {
                Place::Base(i) if self.slots[i].dtype == dtype => i,
                _ => return Err(unsupported(&t.name, "is not a base tensor of its dtype")),
            };
            planned.push(Planned {
                t,
                legacy: legacy(t),
                dtype,
                shape,
                len: t.len() as usize,
                source: Some(i),
                kind: Kind::InPlace(i),
                plan: plan_of(d, t)?,
            });
        }
        Ok(planned)
    }

    /// Takes the base's chunk fingerprints at chunk size `cb` from memory, unless known.
    /// The model must hold the base.
    pub(super) fn fingerprint(&mut self, cb: usize) {
        if self.prints.contains_key(&cb) {
            return;
        }
        let prints = self
            .slots
            .iter()
            .map(|s| s.bytes[..s.len].par_chunks(cb).map(ChunkPrint::of).collect())
            .collect();
        self.prints.insert(cb, prints);
    }

    /// Matches every tensor of the delta with the base tensor it is predicted from, checking
    /// each against the fingerprint the delta records. Needs fingerprints at its chunk size.
    pub(super) fn plan<'d>(&self, d: &'d Delta) -> Result<Vec<Planned<'d>>> {
        let cb = d.index.chunk_bytes as usize;
        let prints = &self.prints[&cb];
        d.index
            .tensors()
            .map(|t| {
                let dtype = dtype::parse(&t.dtype).expect("validated dtype");
                let source = t
                    .source
                    .as_ref()
                    .map(|s| self.source_slot(d, s, &prints[..], cb))
                    .transpose()?;
                let kind = match source {
                    Some(i) if self.slots[i].name == t.name && self.slots[i].dtype == dtype => Kind::InPlace(i),
                    Some(i) if self.slots[i].name == t.name => Kind::Convert(i),
                    _ => Kind::Fresh,
                };
                Ok(Planned {
                    t,
                    legacy: legacy(t),
                    dtype,
                    // Validated: every dimension fits a usize, and so does the byte length.
                    shape: t.shape.iter().map(|&x| x as usize).collect(),
                    len: t.len() as usize,
                    source,
                    kind,
                    plan: plan_of(d, t)?,
                })
            })
            .collect()
    }

    pub(super) fn source_slot(
        &self,
        d: &Delta,
        s: &SourceTensor,
        prints: &[Vec<ChunkPrint>],
        cb: usize,
    ) -> Result<usize> {
        let wrong_or_swapped = |reason: String, swapped: bool| Error::WrongBase {
            path: self.root.clone(),
            part: BasePart::Tensor(s.name.clone()),
            reason,
            expected: d.index.base.expected().swapped(swapped),
        };
        let wrong = |reason: String| wrong_or_swapped(reason, false);
        let i = *self.by_name.get(&s.name).ok_or_else(|| wrong("is missing".into()))?;
        let slot = &self.slots[i];
        let shape: Vec<u64> = slot.shape.iter().map(|&x| x as u64).collect();
        if dtype::name(slot.dtype) != s.dtype || shape != s.shape {
            return Err(wrong(format!(
                "is {} {:?}, the delta expects {} {:?}",
                dtype::name(slot.dtype),
                shape,
                s.dtype,
                s.shape
            )));
        }
        let digests = prints[i].iter().map(|p| &p.digest);
        let got = hash::hex(&hash::tensor(slot.len as u64, cb as u64, digests));
        if got != s.hash {
            let swapped = d.index.rebuilds(&s.name, &got);
            return Err(wrong_or_swapped(
                "has different values (fingerprint mismatch)".into(),
                swapped,
            ));
        }
        Ok(i)
    }
}
