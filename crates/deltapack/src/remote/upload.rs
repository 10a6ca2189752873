//! Writing one object as it is produced, visible only when complete.

use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio::task::JoinHandle;

use super::{block_on, error, runtime, ObjectLocation};
use crate::{Error, Result};

/// Size of a multipart upload's parts (S3 wants at least 5 MiB but the last); an object
/// smaller than one part is written with one PUT. `DELTAPACK_S3_PART_MIB` sets it (5 or more).
const PART: usize = 16 << 20;
/// Parts uploading at once: bounds memory to about `part size * (IN_FLIGHT + 1)`.
const IN_FLIGHT: usize = 3;

fn part_size() -> usize {
    let mib = std::env::var("DELTAPACK_S3_PART_MIB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok());
    mib.map_or(PART, |m| m.max(5) << 20)
}

/// An object being written.
///
/// Nothing is visible at its URL until [`Upload::commit`]: a small object is one PUT at the
/// end, a large one a multipart upload completed at the end. Dropped without a commit (an
/// error, a signal), the multipart upload is aborted; one that a killed process leaves behind
/// is invisible and removed by the server's lifecycle rules or by `store fsck`.
pub struct Upload {
    loc: ObjectLocation,
    force: bool,
    part: usize,
    buf: Vec<u8>,
    multipart: Option<Box<dyn MultipartUpload>>,
    parts: Vec<JoinHandle<object_store::Result<()>>>,
}

impl Upload {
    /// Starts writing `loc`; fails if an object is there and `force` is false.
    pub fn create(loc: &ObjectLocation, force: bool) -> Result<Upload> {
        if !force && exists(loc)? {
            return Err(Error::OutputExists {
                path: loc.url.clone().into(),
            });
        }
        let part = part_size();
        Ok(Upload {
            loc: loc.clone(),
            force,
            part,
            buf: Vec::with_capacity(part),
            multipart: None,
            parts: Vec::new(),
        })
    }

    /// The URL, for messages.
    pub fn url(&self) -> &str {
        &self.loc.url
    }

    /// Appends bytes; a full part starts uploading while writing goes on.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let n = (self.part - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == self.part {
                self.send_part()?;
            }
        }
        Ok(())
    }

    fn send_part(&mut self) -> Result<()> {
        if self.multipart.is_none() {
            let started = block_on(self.loc.store.put_multipart_opts(&self.loc.key, Default::default()));
            self.multipart = Some(started.map_err(|e| error("starting an upload to", &self.loc.url, e))?);
        }
        while self.parts.len() >= IN_FLIGHT {
            let oldest = self.parts.remove(0);
            self.join(oldest)?;
        }
        let part = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part));
        let upload = self.multipart.as_mut().expect("started above");
        let fut = upload.put_part(PutPayload::from(part));
        self.parts.push(runtime().spawn(fut));
        Ok(())
    }

    fn join(&self, part: JoinHandle<object_store::Result<()>>) -> Result<()> {
        match block_on(part) {
            Ok(r) => r.map_err(|e| error("uploading to", &self.loc.url, e)),
            Err(e) => Err(Error::Remote {
                op: "uploading to",
                url: self.loc.url.clone(),
                reason: format!("the upload task failed: {e}"),
            }),
        }
    }

    /// Finishes the object: from here on it is visible, whole, at its URL.
    pub fn commit(mut self) -> Result<()> {
        let Some(mut upload) = self.multipart.take() else {
            let mode = if self.force {
                PutMode::Overwrite
            } else {
                PutMode::Create
            };
            let payload = PutPayload::from(std::mem::take(&mut self.buf));
            let put = block_on(self.loc.store.put_opts(&self.loc.key, payload, PutOptions::from(mode)));
            return match put {
                Ok(_) => Ok(()),
                Err(object_store::Error::AlreadyExists { .. }) => Err(Error::OutputExists {
                    path: self.loc.url.clone().into(),
                }),
                Err(e) => Err(error("writing", &self.loc.url, e)),
            };
        };
        let last = std::mem::take(&mut self.buf);
        let finished = (|| {
            if !last.is_empty() {
                self.parts
                    .push(runtime().spawn(upload.put_part(PutPayload::from(last))));
            }
            for part in std::mem::take(&mut self.parts) {
                self.join(part)?;
            }
            block_on(upload.complete()).map_err(|e| error("completing the upload to", &self.loc.url, e))
        })();
        if finished.is_err() {
            let _ = block_on(upload.abort());
        }
        finished.map(drop)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(mut upload) = self.multipart.take() {
            for part in self.parts.drain(..) {
                part.abort();
            }
            let _ = block_on(upload.abort());
        }
    }
}

/// Whether an object is at `loc`.
pub(crate) fn exists(loc: &ObjectLocation) -> Result<bool> {
    match block_on(loc.store.head(&loc.key)) {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(error("checking", &loc.url, e)),
    }
}
