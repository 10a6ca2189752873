//! Writing one object as it is produced, visible only when complete.

use std::collections::VecDeque;
use std::sync::Arc;

use object_store::multipart::{MultipartStore, PartId};
use object_store::{MultipartId, MultipartUpload, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{block_on, error, exists, runtime, ObjectLocation};
use crate::{hash, Error, Result};

/// Size of a multipart upload's parts (S3 wants at least 5 MiB but the last); an object
/// smaller than one part is written with one PUT. `DELTAPACK_S3_PART_MIB` sets it (5 or more).
const PART: usize = 16 << 20;
/// Parts uploading at once: bounds memory to about `part size * (IN_FLIGHT + 1)`.
const IN_FLIGHT: usize = 3;
/// What names an upload's marker: `KEY.deltapack-upload-ID`.
const MARKER: &str = ".deltapack-upload-";

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
/// error, a signal), the multipart upload is aborted. On S3, a multipart upload in progress
/// also has a small marker object beside it (`KEY.deltapack-upload-ID`, naming the upload),
/// removed when the upload completes or is aborted: one that a killed process leaves behind
/// lets `store fsck` abort the upload, which S3 would otherwise keep (and bill) invisibly.
pub struct Upload {
    loc: ObjectLocation,
    force: bool,
    part: usize,
    buf: Vec<u8>,
    parts: Parts,
}

/// The multipart upload, once the first part is full.
enum Parts {
    NotStarted,
    /// Through `MultipartStore` (S3): the upload id is known and recorded in a marker.
    Tracked {
        store: Arc<dyn MultipartStore>,
        id: MultipartId,
        marker: ObjectLocation,
        done: Vec<PartId>,
        in_flight: VecDeque<JoinHandle<object_store::Result<PartId>>>,
    },
    /// Through `put_multipart` (other stores: the local file system).
    Plain {
        upload: Box<dyn MultipartUpload>,
        in_flight: VecDeque<JoinHandle<object_store::Result<()>>>,
    },
}

/// The contents of an upload's marker.
#[derive(Serialize, Deserialize)]
struct Marker {
    key: String,
    upload_id: String,
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
            parts: Parts::NotStarted,
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
                let part = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part));
                self.send(part)?;
            }
        }
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        let loc = &self.loc;
        self.parts = match &loc.multipart {
            Some(store) => {
                let id = block_on(store.create_multipart(&loc.key))
                    .map_err(|e| error("starting an upload to", &loc.url, e))?;
                let tag = &hash::hex(blake3::hash(id.as_bytes()).as_bytes())[..16];
                let marker = ObjectLocation {
                    url: format!("{}{MARKER}{tag}", loc.url),
                    key: format!("{}{MARKER}{tag}", loc.key).into(),
                    ..loc.clone()
                };
                let record = Marker {
                    key: loc.key.to_string(),
                    upload_id: id.clone(),
                };
                let body = serde_json::to_vec(&record).expect("a marker serialises");
                let put = block_on(marker.store.put(&marker.key, PutPayload::from(body)));
                if let Err(e) = put {
                    let _ = block_on(store.abort_multipart(&loc.key, &id));
                    return Err(error("starting an upload to", &loc.url, e));
                }
                Parts::Tracked {
                    store: store.clone(),
                    id,
                    marker,
                    done: Vec::new(),
                    in_flight: VecDeque::new(),
                }
            }
            None => {
                let upload = block_on(loc.store.put_multipart_opts(&loc.key, Default::default()))
                    .map_err(|e| error("starting an upload to", &loc.url, e))?;
                Parts::Plain {
                    upload,
                    in_flight: VecDeque::new(),
                }
            }
        };
        Ok(())
    }

    /// Starts uploading `part`, after waiting for the oldest part when too many are in flight.
    fn send(&mut self, part: Vec<u8>) -> Result<()> {
        if matches!(self.parts, Parts::NotStarted) {
            self.start()?;
        }
        let url = self.loc.url.clone();
        let key = self.loc.key.clone();
        match &mut self.parts {
            Parts::NotStarted => unreachable!("started above"),
            Parts::Tracked {
                store,
                id,
                done,
                in_flight,
                ..
            } => {
                if in_flight.len() >= IN_FLIGHT {
                    done.push(join(&url, in_flight.pop_front().expect("in flight"))?);
                }
                let (store, id, idx) = (store.clone(), id.clone(), done.len() + in_flight.len());
                let payload = PutPayload::from(part);
                in_flight.push_back(runtime().spawn(async move { store.put_part(&key, &id, idx, payload).await }));
            }
            Parts::Plain { upload, in_flight } => {
                if in_flight.len() >= IN_FLIGHT {
                    join(&url, in_flight.pop_front().expect("in flight"))?;
                }
                in_flight.push_back(runtime().spawn(upload.put_part(PutPayload::from(part))));
            }
        }
        Ok(())
    }

    /// Finishes the object: from here on it is visible, whole, at its URL.
    pub fn commit(mut self) -> Result<()> {
        if matches!(self.parts, Parts::NotStarted) {
            return self.put_whole();
        }
        let last = std::mem::take(&mut self.buf);
        if !last.is_empty() {
            self.send(last)?;
        }
        let url = self.loc.url.clone();
        match std::mem::replace(&mut self.parts, Parts::NotStarted) {
            Parts::NotStarted => unreachable!("started"),
            Parts::Tracked {
                store,
                id,
                marker,
                mut done,
                in_flight,
            } => {
                let finished = (|| {
                    for p in in_flight {
                        done.push(join(&url, p)?);
                    }
                    block_on(store.complete_multipart(&self.loc.key, &id, done))
                        .map_err(|e| error("completing the upload to", &url, e))
                })();
                if finished.is_err() {
                    let _ = block_on(store.abort_multipart(&self.loc.key, &id));
                }
                let _ = block_on(marker.store.delete(&marker.key));
                finished.map(drop)
            }
            Parts::Plain { mut upload, in_flight } => {
                let finished = (|| {
                    for p in in_flight {
                        join(&url, p)?;
                    }
                    block_on(upload.complete()).map_err(|e| error("completing the upload to", &url, e))
                })();
                if finished.is_err() {
                    let _ = block_on(upload.abort());
                }
                finished.map(drop)
            }
        }
    }

    /// One PUT of the whole (small) object: create-only unless forced.
    fn put_whole(&mut self) -> Result<()> {
        let mode = if self.force {
            PutMode::Overwrite
        } else {
            PutMode::Create
        };
        let payload = PutPayload::from(std::mem::take(&mut self.buf));
        let put = block_on(self.loc.store.put_opts(&self.loc.key, payload, PutOptions::from(mode)));
        match put {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(Error::OutputExists {
                path: self.loc.url.clone().into(),
            }),
            Err(e) => Err(error("writing", &self.loc.url, e)),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.parts, Parts::NotStarted) {
            Parts::NotStarted => {}
            Parts::Tracked {
                store,
                id,
                marker,
                in_flight,
                ..
            } => {
                in_flight.iter().for_each(JoinHandle::abort);
                let _ = block_on(store.abort_multipart(&self.loc.key, &id));
                let _ = block_on(marker.store.delete(&marker.key));
            }
            Parts::Plain { mut upload, in_flight } => {
                in_flight.iter().for_each(JoinHandle::abort);
                let _ = block_on(upload.abort());
            }
        }
    }
}

/// The result of an uploading part.
fn join<T>(url: &str, part: JoinHandle<object_store::Result<T>>) -> Result<T> {
    match block_on(part) {
        Ok(r) => r.map_err(|e| error("uploading to", url, e)),
        Err(e) => Err(Error::Remote {
            op: "uploading to",
            url: url.to_string(),
            reason: format!("the upload task failed: {e}"),
        }),
    }
}

/// Whether an object key is an upload's marker.
pub(crate) fn is_upload_marker(key: &str) -> bool {
    key.contains(MARKER)
}

/// Aborts the multipart upload the marker at `marker` records, then deletes the marker.
pub(crate) fn abort_abandoned(marker: &ObjectLocation) -> Result<()> {
    if let (Some(store), Some((bytes, _))) = (&marker.multipart, super::get(marker)?) {
        let record: Marker = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(marker.url.clone(), format!("upload marker does not parse: {e}")))?;
        let key = object_store::path::Path::parse(&record.key)
            .map_err(|e| Error::corrupt(marker.url.clone(), format!("upload marker names a bad key: {e}")))?;
        match block_on(store.abort_multipart(&key, &record.upload_id)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(error("aborting the upload recorded in", &marker.url, e)),
        }
    }
    super::delete(marker)
}
