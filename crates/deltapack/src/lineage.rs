//! Deltas made along a chain: a child coded against the model its parents rebuild
//! ([`make_child`]), a chain squashed into one delta ([`squash`]), a chain re-coded against
//! another base ([`rebase`]).
//!
//! Each rebuilds the parent model once into a temporary directory next to the output
//! (removed afterwards, also on error or a signal) and codes against it: that costs one
//! `apply` of the parent and its size in temporary disk space, never memory. A child made
//! against the *reconstruction* of its parent (closed loop) keeps a lossy link's error from
//! adding up along the chain.

use std::path::{Path, PathBuf};

use crate::apply::{rebuild_chain, ApplyOptions};
use crate::chain::Chain;
use crate::checkpoint::{check_output_disjoint, check_overwrite, Checkpoint, ScratchDir};
use crate::make::{make, make_from, MakeOptions, MakeReport};
use crate::progress::Progress;
use crate::Result;

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
    check_output_disjoint(out, &[("fine-tune", finetuned)])?;
    let ft = Checkpoint::open(finetuned)?;
    make_child_from(base, parents, &ft, out, opts, aux_store, progress)
}

/// [`make_child`] of an opened fine-tune (on disk or in memory).
pub fn make_child_from(
    base: &Path,
    parents: &[PathBuf],
    finetuned: &Checkpoint,
    out: &Path,
    opts: &MakeOptions,
    aux_store: Option<&Path>,
    progress: &dyn Progress,
) -> Result<MakeReport> {
    if parents.is_empty() {
        return make_from(&Checkpoint::open(base)?, finetuned, out, opts, progress);
    }
    let mut inputs = vec![("base", base), ("fine-tune", finetuned.root.as_path())];
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
    make_from(&Checkpoint::open(&model)?, finetuned, out, &opts, progress)
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
