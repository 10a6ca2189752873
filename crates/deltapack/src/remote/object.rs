//! One object read by ranges, pinned to the version first seen.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use object_store::{GetOptions, GetRange, ObjectStore};

use super::{block_on, error, ObjectLocation};
use crate::Result;

/// Ranges closer than this are fetched as one request: a request costs a round trip (tens of
/// milliseconds to S3), 64 KiB is about what a round trip could have carried.
const COALESCE_GAP: u64 = 64 << 10;
/// Ranges fetched at once by [`RemoteFile::read_many`].
const IN_FLIGHT: usize = 8;

/// An object opened for ranged reads.
///
/// Every read after the first carries `If-Match` with the ETag the first one saw: an object
/// replaced while it is read fails loudly instead of mixing two versions' bytes.
#[derive(Debug)]
pub struct RemoteFile {
    loc: ObjectLocation,
    size: u64,
    e_tag: Option<String>,
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl RemoteFile {
    /// Opens the object with one request for its last `tail` bytes (the whole object if it is
    /// smaller); returns them with the file.
    pub fn open_tail(loc: &ObjectLocation, tail: u64) -> Result<(RemoteFile, Bytes)> {
        let opts = GetOptions {
            range: Some(GetRange::Suffix(tail.max(1))),
            ..GetOptions::default()
        };
        let got = block_on(async {
            let r = loc.store.get_opts(&loc.key, opts).await?;
            let (meta, range) = (r.meta.clone(), r.range.clone());
            Ok::<_, object_store::Error>((meta, range, r.bytes().await?))
        })
        .map_err(|e| error("reading", &loc.url, e))?;
        let (meta, range, bytes) = got;
        let file = RemoteFile {
            loc: loc.clone(),
            size: meta.size,
            e_tag: meta.e_tag,
            requests: AtomicU64::new(1),
            bytes: AtomicU64::new(bytes.len() as u64),
        };
        if range.end != meta.size || bytes.len() as u64 != range.end - range.start {
            return Err(crate::Error::Remote {
                op: "reading",
                url: loc.url.clone(),
                reason: format!(
                    "the server answered a request for the last {tail} bytes with bytes {range:?} of {}",
                    meta.size
                ),
            });
        }
        Ok((file, bytes))
    }

    /// The URL, for messages.
    pub fn url(&self) -> &str {
        &self.loc.url
    }

    /// Size of the object in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Requests made and bytes received so far.
    pub fn fetched(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Bytes `range` of the object, in one request.
    pub fn read(&self, range: Range<u64>) -> Result<Bytes> {
        let mut v = self.read_many(std::slice::from_ref(&range))?;
        Ok(v.pop().expect("one range asked, one returned"))
    }

    /// Bytes of each of `ranges`: ranges closer than 64 KiB are fetched together, up to 8
    /// requests in flight.
    pub fn read_many(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.read_ranges(ranges, COALESCE_GAP)
    }

    /// Bytes of each of `ranges`, only touching ranges fetched together: nothing between
    /// them is fetched.
    pub fn read_apart(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.read_ranges(ranges, 0)
    }

    fn read_ranges(&self, ranges: &[Range<u64>], gap: u64) -> Result<Vec<Bytes>> {
        if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > self.size) {
            return Err(crate::Error::Remote {
                op: "reading",
                url: self.loc.url.clone(),
                reason: format!("bytes {r:?} are outside the object's {} bytes", self.size),
            });
        }
        let fetch = |r: Range<u64>| async move {
            if r.is_empty() {
                return Ok(Bytes::new());
            }
            let opts = GetOptions {
                range: Some(GetRange::Bounded(r.clone())),
                if_match: self.e_tag.clone(),
                ..GetOptions::default()
            };
            let bytes = self.loc.store.get_opts(&self.loc.key, opts).await?.bytes().await?;
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if bytes.len() as u64 != r.end - r.start {
                return Err(object_store::Error::Generic {
                    store: "deltapack",
                    source: format!("asked for bytes {r:?}, received {}", bytes.len()).into(),
                });
            }
            Ok(bytes)
        };
        block_on(coalesced(ranges, gap, fetch)).map_err(|e| error("reading", &self.loc.url, e))
    }
}

/// `ranges` fetched by `fetch`, neighbours closer than `gap` merged into one request and at
/// most [`IN_FLIGHT`] requests at a time. `object_store::coalesce_ranges` does this too but
/// fetches with plain GETs: ours carry the ETag.
async fn coalesced<F, Fut>(ranges: &[Range<u64>], gap: u64, fetch: F) -> object_store::Result<Vec<Bytes>>
where
    F: Fn(Range<u64>) -> Fut,
    Fut: std::future::Future<Output = object_store::Result<Bytes>>,
{
    use futures::stream::{StreamExt, TryStreamExt};
    let spans = merge(ranges, gap);
    let fetched: Vec<Bytes> = futures::stream::iter(spans.iter().cloned().map(&fetch))
        .buffered(IN_FLIGHT)
        .try_collect()
        .await?;
    Ok(ranges
        .iter()
        .map(|r| {
            if r.is_empty() {
                return Bytes::new();
            }
            // Spans are sorted and disjoint: the first to end at or after `r` holds it.
            let k = spans.partition_point(|s| s.end < r.end);
            let s = &spans[k];
            fetched[k].slice((r.start - s.start) as usize..(r.end - s.start) as usize)
        })
        .collect())
}

/// The sorted spans that cover `ranges`, neighbours closer than `gap` merged.
fn merge(ranges: &[Range<u64>], gap: u64) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = ranges.iter().filter(|r| !r.is_empty()).cloned().collect();
    sorted.sort_by_key(|r| r.start);
    let mut spans: Vec<Range<u64>> = Vec::new();
    for r in sorted {
        match spans.last_mut() {
            Some(s) if r.start <= s.end.saturating_add(gap) => s.end = s.end.max(r.end),
            _ => spans.push(r),
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_merge_and_every_range_gets_its_bytes() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        let ranges = vec![
            500_000..500_100,
            0..10,
            10..20,
            5..15,
            300_000..300_000,
            900_000..1_000_000,
            20..70_000,
        ];
        let spans = merge(&ranges, COALESCE_GAP);
        assert_eq!(spans, vec![0..70_000, 500_000..500_100, 900_000..1_000_000]);
        assert_eq!(merge(&[0..10, 20..30, 30..40], 0), vec![0..10, 20..40]);
        let fetch = |r: Range<u64>| {
            let b = Bytes::copy_from_slice(&data[r.start as usize..r.end as usize]);
            async move { Ok(b) }
        };
        let got = block_on(coalesced(&ranges, COALESCE_GAP, fetch)).unwrap();
        for (r, b) in ranges.iter().zip(&got) {
            assert_eq!(&b[..], &data[r.start as usize..r.end as usize], "{r:?}");
        }
    }
}
