//! Chains of deltas: a base and the deltas that continue one another from it.
//!
//! A child delta is made against the *reconstruction* of its parent (closed loop), so a
//! lossy link's error does not add up along the chain. The child records its parent's
//! [`Index::model_fingerprint`](crate::container::index::Index::model_fingerprint), and
//! every source tensor's fingerprint is the parent's rebuilt tensor's: [`Chain::open`] checks
//! both before anything is decoded, and applying checks the bytes as they stream.
//!
//! Making a child, squashing and rebasing rebuild the parent model once into a temporary
//! directory next to the output (removed afterwards, also on error) and code against it:
//! that costs one `apply` of the parent and its size in temporary disk space, never memory.

use std::path::{Path, PathBuf};

use crate::apply::{rebuild_chain, ApplyOptions};
use crate::checkpoint::{check_output_disjoint, check_overwrite, Checkpoint, ScratchDir};
use crate::container::index::ParentLink;
use crate::container::Delta;
use crate::make::{make, MakeOptions, MakeReport};
use crate::progress::Progress;
use crate::{Error, Result};

/// A base checkpoint and a chain of deltas on it, opened and with every link checked.
pub struct Chain {
    /// The base the first delta was made from.
    pub base: Checkpoint,
    /// The deltas, from the one made against the base to the last child.
    pub deltas: Vec<Delta>,
    /// Directory of content-addressed files (`<blake3 hex>`) for deltas whose auxiliary files
    /// are kept outside them (a store's); `None` for standalone deltas.
    pub aux_store: Option<PathBuf>,
}

impl Chain {
    /// Opens `base` and `deltas` (in order from the base) and checks that each delta
    /// continues the one before it.
    pub fn open(base: &Path, deltas: &[PathBuf]) -> Result<Chain> {
        if deltas.is_empty() {
            return Err(Error::InvalidArgument("no delta given".into()));
        }
        let deltas = deltas.iter().map(|p| Delta::open(p)).collect::<Result<Vec<_>>>()?;
        check_links(&deltas)?;
        Ok(Chain {
            base: Checkpoint::open(base)?,
            deltas,
            aux_store: None,
        })
    }

    /// The link a child of this chain's last delta records.
    pub fn link(&self) -> ParentLink {
        let last = self.deltas.last().expect("a chain has a delta");
        ParentLink {
            fingerprint: last.index.model_fingerprint(),
            depth: self.deltas.len() as u32,
            file: last.path.file_name().map(|n| n.to_string_lossy().into_owned()),
        }
    }
}

/// Each delta must continue the one before it; the first must be made against a base.
pub fn check_links(deltas: &[Delta]) -> Result<()> {
    for (i, d) in deltas.iter().enumerate() {
        match (&d.index.parent, i.checked_sub(1).map(|p| &deltas[p])) {
            (None, None) => {}
            (Some(p), None) => {
                return Err(Error::WrongParent {
                    path: d.path.clone(),
                    reason: format!(
                        "it continues another delta ({} deltas from the base{}), not the base; \
                         give the whole chain from the base, in order",
                        p.depth,
                        p.file
                            .as_ref()
                            .map(|f| format!(", last made from {f}"))
                            .unwrap_or_default()
                    ),
                })
            }
            (None, Some(prev)) => {
                return Err(Error::WrongParent {
                    path: d.path.clone(),
                    reason: format!(
                        "it is made against a base, not against {}; give it first (or alone)",
                        prev.path.display()
                    ),
                })
            }
            (Some(p), Some(prev)) if p.fingerprint != prev.index.model_fingerprint() => {
                return Err(Error::WrongParent {
                    path: d.path.clone(),
                    reason: format!(
                        "it continues a model with fingerprint {}, but {} rebuilds {}; \
                         give its own parent chain, in order",
                        &p.fingerprint[..16],
                        prev.path.display(),
                        &prev.index.model_fingerprint()[..16]
                    ),
                })
            }
            (Some(_), Some(_)) => {}
        }
    }
    Ok(())
}

/// A temporary directory next to `out` (so on its filesystem), removed when dropped, with
/// `chain`'s model rebuilt in it as `model/`.
fn rebuild_next_to(chain: &Chain, out: &Path, progress: &dyn Progress) -> Result<(ScratchDir, PathBuf)> {
    let scratch = ScratchDir::beside(out)?;
    let model = scratch.path().join("model");
    rebuild_chain(chain, &model, &ApplyOptions::default(), progress)?;
    Ok((scratch, model))
}

/// Makes a delta of `finetuned` against the model the chain `parents` (on `base`) rebuilds,
/// recording the link; `opts.base_id` defaults to the chain's, and the chunk size is the
/// parent's.
pub fn make_child(
    base: &Path,
    parents: &[PathBuf],
    finetuned: &Path,
    out: &Path,
    opts: &MakeOptions,
    aux_store: Option<&Path>,
    progress: &dyn Progress,
) -> Result<MakeReport> {
    if parents.is_empty() {
        return make(base, finetuned, out, opts, progress);
    }
    let mut inputs = vec![("base", base), ("fine-tune", finetuned)];
    inputs.extend(parents.iter().map(|p| ("parent delta", p.as_path())));
    check_output_disjoint(out, &inputs)?;
    check_overwrite(out, opts.force)?;
    let mut chain = Chain::open(base, parents)?;
    chain.aux_store = aux_store.map(Path::to_path_buf);
    let mut opts = opts.clone();
    opts.parent = Some(chain.link());
    opts.self_contained = false;
    // Fingerprints depend on the chunk size: a child records its sources' fingerprints as
    // its parent recorded them only at the same size.
    opts.chunk_bytes = chain.deltas.last().expect("a parent").index.chunk_bytes as usize;
    if opts.base_id.is_none() {
        opts.base_id = chain.deltas[0].index.base.id.clone();
    }
    let (_scratch, model) = rebuild_next_to(&chain, out, progress)?;
    drop(chain);
    make(&model, finetuned, out, &opts, progress)
}

/// Turns the chain `deltas` on `base` into one delta against `base` that rebuilds the same
/// model (the same bytes, whatever codecs the links used, with the default exact codec).
pub fn squash(
    base: &Path,
    deltas: &[PathBuf],
    out: &Path,
    opts: &MakeOptions,
    progress: &dyn Progress,
) -> Result<MakeReport> {
    rebase(base, deltas, base, out, opts, progress)
}

/// Re-codes the model the chain `deltas` on `base` rebuilds as a delta against `onto`.
pub fn rebase(
    base: &Path,
    deltas: &[PathBuf],
    onto: &Path,
    out: &Path,
    opts: &MakeOptions,
    progress: &dyn Progress,
) -> Result<MakeReport> {
    let mut inputs = vec![("base", base), ("new base", onto)];
    inputs.extend(deltas.iter().map(|d| ("delta", d.as_path())));
    check_output_disjoint(out, &inputs)?;
    check_overwrite(out, opts.force)?;
    let chain = Chain::open(base, deltas)?;
    let mut opts = opts.clone();
    opts.parent = None;
    if opts.base_id.is_none() && onto == base {
        opts.base_id = chain.deltas[0].index.base.id.clone();
    }
    let (_scratch, model) = rebuild_next_to(&chain, out, progress)?;
    drop(chain);
    make(onto, &model, out, &opts, progress)
}
