//! Whole-object operations the store needs: small conditional PUTs, downloads, listings.

use std::io::Write;
use std::path::Path;

use futures::StreamExt;
use object_store::{ObjectMeta, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::{block_on, error, ObjectLocation};
use crate::{hash, Error, Result};

/// How a conditional PUT ended.
pub(crate) enum Put {
    /// Written.
    Done,
    /// The condition did not hold: the object exists (create) or changed (update).
    Lost,
}

/// Writes `bytes` at `loc`: only if absent (`None`), or only if still at `version`.
pub(crate) fn put(loc: &ObjectLocation, bytes: Vec<u8>, version: Option<UpdateVersion>) -> Result<Put> {
    let mode = match version {
        None => PutMode::Create,
        Some(v) => PutMode::Update(v),
    };
    let r = block_on(
        loc.store
            .put_opts(&loc.key, PutPayload::from(bytes), PutOptions::from(mode)),
    );
    match r {
        Ok(_) => Ok(Put::Done),
        Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(Put::Lost),
        Err(e) => Err(error("writing", &loc.url, e)),
    }
}

/// The object at `loc` and its version, or `None` if there is none.
pub(crate) fn get(loc: &ObjectLocation) -> Result<Option<(Vec<u8>, UpdateVersion)>> {
    let r = block_on(async {
        let got = loc.store.get(&loc.key).await?;
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        Ok::<_, object_store::Error>((got.bytes().await?.to_vec(), version))
    });
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(error("reading", &loc.url, e)),
    }
}

/// Streams the object at `loc` into the new file `dest`; returns its size and BLAKE3.
pub(crate) fn download(loc: &ObjectLocation, dest: &Path) -> Result<(u64, hash::Digest)> {
    let mut f = std::fs::File::create_new(dest).map_err(|e| Error::io("creating", dest, e))?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let r = block_on(async {
        let mut stream = loc.store.get(&loc.key).await?.into_stream();
        while let Some(part) = stream.next().await {
            let part = part?;
            hasher.update(&part);
            size += part.len() as u64;
            if let Err(e) = f.write_all(&part) {
                return Ok(Err(Error::io("writing", dest, e)));
            }
        }
        Ok::<_, object_store::Error>(Ok(()))
    });
    r.map_err(|e| error("downloading", &loc.url, e))??;
    f.sync_all().map_err(|e| Error::io("syncing", dest, e))?;
    Ok((size, *hasher.finalize().as_bytes()))
}

/// Every object under the prefix `loc`.
pub(crate) fn list(loc: &ObjectLocation) -> Result<Vec<ObjectMeta>> {
    let r = block_on(async {
        let mut stream = loc.store.list(Some(&loc.key));
        let mut out = Vec::new();
        while let Some(m) = stream.next().await {
            out.push(m?);
        }
        Ok::<_, object_store::Error>(out)
    });
    r.map_err(|e| error("listing", &loc.url, e))
}

/// Deletes the object at `loc` (one already gone is fine).
pub(crate) fn delete(loc: &ObjectLocation) -> Result<()> {
    match block_on(loc.store.delete(&loc.key)) {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(error("deleting", &loc.url, e)),
    }
}

/// The metadata of the object at `loc`.
pub(crate) fn head(loc: &ObjectLocation) -> Result<ObjectMeta> {
    block_on(loc.store.head(&loc.key)).map_err(|e| error("reading", &loc.url, e))
}

/// Whether an object is at `loc`.
pub(crate) fn exists(loc: &ObjectLocation) -> Result<bool> {
    match block_on(loc.store.head(&loc.key)) {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(error("checking", &loc.url, e)),
    }
}
