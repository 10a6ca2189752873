//! Chains of deltas: a base and the deltas that continue one another from it.
//!
//! A child delta is made against the *reconstruction* of its parent (closed loop), so a
//! lossy link's error does not add up along the chain. The child records its parent's
//! [`Index::model_fingerprint`](crate::container::index::Index::model_fingerprint), and
//! every source tensor's fingerprint is the parent's rebuilt tensor's: [`Chain::open`] checks
//! both before anything is decoded, and applying checks the bytes as they stream.
//!
//! This module is the data: a chain opened and its links checked. Making a child, squashing
//! and rebasing are in `lineage`, above both `apply` and `make`.

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::container::index::ParentLink;
use crate::container::Delta;
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
        let deltas = open_deltas(deltas)?;
        Ok(Chain {
            base: Checkpoint::open_lazy(base)?,
            deltas,
            aux_store: None,
        })
    }

    /// [`Chain::open`] on a base already opened: one on disk or held in memory
    /// ([`Checkpoint::from_memory`]; the base's other files are then not at hand, so deltas
    /// that store files against the base's cannot rebuild those).
    pub fn on(base: Checkpoint, deltas: &[PathBuf]) -> Result<Chain> {
        Ok(Chain {
            base,
            deltas: open_deltas(deltas)?,
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

fn open_deltas(deltas: &[PathBuf]) -> Result<Vec<Delta>> {
    if deltas.is_empty() {
        return Err(Error::InvalidArgument("no delta given".into()));
    }
    let deltas = deltas.iter().map(|p| Delta::open(p)).collect::<Result<Vec<_>>>()?;
    check_links(&deltas)?;
    Ok(deltas)
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
