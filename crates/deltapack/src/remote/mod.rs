//! Object storage: deltas, bases and stores at `s3://` and `file://` URLs.
//!
//! A location is a local path or a URL ([`Location::parse`]). `s3://BUCKET/KEY` reaches S3 or
//! any S3-compatible server (MinIO, Ceph, R2, moto) through the `object_store` crate, which
//! signs requests, retries and does multipart uploads: no HTTP code of ours. `file://PATH`
//! goes through the same crate's local backend, so the ranged-read path is the same for both.
//!
//! Endpoint, region and credentials come from the standard AWS environment variables
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`, ...), read by
//! `AmazonS3Builder::from_env`; [`set_endpoint`] overrides the endpoint for the process (the
//! CLI's `--endpoint`). Requests are path-style (`ENDPOINT/BUCKET/KEY`) unless
//! `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`, so any S3-compatible server works; an `http://`
//! endpoint is allowed because the user named it.
//!
//! Failed requests (connection refused, timeouts, 5xx, 503 SlowDown) are retried with
//! exponential backoff, at most [`RetryPolicy::retries`] times and [`RetryPolicy::timeout`]
//! in all (`DELTAPACK_S3_RETRIES`, `DELTAPACK_S3_RETRY_TIMEOUT` in seconds), then reported as
//! [`Error::Remote`] naming the URL.
//!
//! The crate is async; deltapack's engine is not. One small tokio runtime per process runs the
//! requests, and callers block on it ([`block_on`]) from their own (rayon or plain) threads.

mod cache;
mod object;
mod objects;
mod upload;

pub use cache::{fetch_checkpoint, FetchedCheckpoint};
pub(crate) use cache::{list_checkpoint, Cache, CachedFile};
pub use object::RemoteFile;
pub(crate) use objects::{delete, download, exists, get, head, list, put, Put};
pub use upload::Upload;
pub(crate) use upload::{abort_abandoned, is_upload_marker};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

use crate::{Error, Result};

/// Where a delta, a base or a store lives.
#[derive(Debug, Clone)]
pub enum Location {
    /// A path on this machine (also what a `file://` URL names, when opened as a plain file).
    Local(PathBuf),
    /// An object (or a prefix of objects) in an object store.
    Object(ObjectLocation),
}

/// An object, or a prefix, in an object store.
#[derive(Clone)]
pub struct ObjectLocation {
    /// The URL as the user wrote it, for messages.
    pub url: String,
    /// The store (a bucket, or the local file system).
    pub store: Arc<dyn ObjectStore>,
    /// The key within the store.
    pub key: Key,
    /// The same store's multipart API, where it has one (S3): uploads through it have an id
    /// deltapack records, so that an abandoned one can be aborted.
    pub(crate) multipart: Option<Arc<dyn MultipartStore>>,
}

impl std::fmt::Debug for ObjectLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectLocation").field("url", &self.url).finish()
    }
}

/// A bucket's store, as both APIs.
#[derive(Clone)]
struct Backend {
    store: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
}

impl ObjectLocation {
    /// The object `rel` (a relative key, `/`-separated) under this prefix.
    pub fn join(&self, rel: &str) -> ObjectLocation {
        let key = rel
            .split('/')
            .filter(|p| !p.is_empty())
            .fold(self.key.clone(), |k, part| k.clone().join(part));
        ObjectLocation {
            url: format!("{}/{}", self.url.trim_end_matches('/'), rel.trim_start_matches('/')),
            store: self.store.clone(),
            key,
            multipart: self.multipart.clone(),
        }
    }
}

impl Location {
    /// Reads `s` as a location: `s3://BUCKET/KEY` and `file:///ABS/PATH` are objects, anything
    /// else is a local path. Other URL schemes are refused rather than taken as a directory
    /// named `scheme:`.
    pub fn parse(s: &str) -> Result<Location> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return Ok(Location::Local(PathBuf::from(s)));
        };
        if !looks_like_scheme(scheme) {
            return Ok(Location::Local(PathBuf::from(s)));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => s3_location(s, rest).map(Location::Object),
            "file" => file_location(s, rest).map(Location::Object),
            _ => Err(Error::InvalidArgument(format!(
                "'{s}' is a URL of a scheme deltapack does not read: use a local path, s3://BUCKET/KEY or file:///PATH"
            ))),
        }
    }

    /// [`Location::parse`] of a path given as a `Path` (command-line arguments and Python
    /// strings arrive as paths).
    pub fn of_path(p: &Path) -> Result<Location> {
        match p.to_str() {
            Some(s) => Location::parse(s),
            None => Ok(Location::Local(p.to_path_buf())),
        }
    }
}

/// Whether `p` names an object (`s3://`, `file://`) rather than a local path.
pub fn is_url(p: &Path) -> bool {
    p.to_str()
        .and_then(|s| s.split_once("://"))
        .is_some_and(|(scheme, _)| looks_like_scheme(scheme))
}

fn looks_like_scheme(s: &str) -> bool {
    !s.is_empty()
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

fn s3_location(url: &str, rest: &str) -> Result<ObjectLocation> {
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "'{url}' names no bucket: write s3://BUCKET/KEY"
        )));
    }
    let key = parse_key(url, key)?;
    let backend = s3_store(bucket)?;
    Ok(ObjectLocation {
        url: url.to_string(),
        store: backend.store,
        key,
        multipart: backend.multipart,
    })
}

fn file_location(url: &str, rest: &str) -> Result<ObjectLocation> {
    // file:///abs/path has an empty host; file://localhost/abs/path names this machine too.
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "'{url}' is not an absolute file URL: write file:///ABSOLUTE/PATH"
        )));
    }
    let key = parse_key(url, path.trim_start_matches('/'))?;
    let backend = stores()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry("file://".into())
        .or_insert_with(|| Backend {
            store: Arc::new(LocalFileSystem::new()),
            multipart: None,
        })
        .clone();
    Ok(ObjectLocation {
        url: url.to_string(),
        store: backend.store,
        key,
        multipart: None,
    })
}

fn parse_key(url: &str, key: &str) -> Result<Key> {
    let key = key.trim_end_matches('/');
    Key::parse(key).map_err(|e| Error::InvalidArgument(format!("'{url}' is not a valid object key: {e}")))
}

/// Object stores by bucket, built once per process (each holds its connection pool).
fn stores() -> &'static Mutex<HashMap<String, Backend>> {
    static STORES: OnceLock<Mutex<HashMap<String, Backend>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

static ENDPOINT: Mutex<Option<String>> = Mutex::new(None);

/// Sets the S3 endpoint for this process (over `AWS_ENDPOINT_URL`); stores opened before keep
/// theirs.
pub fn set_endpoint(endpoint: Option<&str>) {
    *ENDPOINT.lock().unwrap_or_else(|e| e.into_inner()) = endpoint.map(str::to_string);
    stores().lock().unwrap_or_else(|e| e.into_inner()).clear();
}

fn s3_store(bucket: &str) -> Result<Backend> {
    let endpoint = ENDPOINT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
    // A process may reach the same bucket name on two servers (Python code changing
    // AWS_ENDPOINT_URL between calls): stores are kept by both.
    let id = format!("{}|{bucket}", endpoint.as_deref().unwrap_or(""));
    let mut stores = stores().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = stores.get(&id) {
        return Ok(s.clone());
    }
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(RetryPolicy::from_env().config());
    if let Some(e) = endpoint {
        // The user named this endpoint: plain http is theirs to choose (a local MinIO, a test
        // server).
        b = b.with_allow_http(e.starts_with("http://")).with_endpoint(e);
    }
    if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
        // S3-compatible servers ignore the region but sign with it; AWS's own default.
        b = b.with_region("us-east-1");
    }
    let s3 = Arc::new(b.build().map_err(|e| Error::Remote {
        op: "configuring",
        url: format!("s3://{bucket}"),
        reason: format!("{e}; {CREDENTIALS_HINT}"),
    })?);
    let backend = Backend {
        store: s3.clone(),
        multipart: Some(s3),
    };
    stores.insert(id, backend.clone());
    Ok(backend)
}

/// What a credentials or configuration error adds.
const CREDENTIALS_HINT: &str = "deltapack reads the endpoint, region and credentials from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (or the instance's metadata service when no key is set)";

/// How failed requests are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries of one request before its error is reported.
    pub retries: usize,
    /// Time from a request's first try after which it is not retried again.
    pub timeout: Duration,
}

impl RetryPolicy {
    /// The policy of `DELTAPACK_S3_RETRIES` (default 30) and `DELTAPACK_S3_RETRY_TIMEOUT`
    /// (seconds, default 120): with backoff growing to 10 s, a server restarting within a
    /// minute or two is waited for.
    pub fn from_env() -> RetryPolicy {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<f64>().ok());
        RetryPolicy {
            retries: var("DELTAPACK_S3_RETRIES").map_or(30, |v| v.max(0.0) as usize),
            timeout: Duration::from_secs_f64(var("DELTAPACK_S3_RETRY_TIMEOUT").map_or(120.0, |v| v.max(0.0))),
        }
    }

    fn config(self) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(10),
                base: 2.0,
            },
            max_retries: self.retries,
            retry_timeout: self.timeout,
        }
    }
}

/// The process's runtime for object-store requests: two worker threads are plenty, the
/// requests spend their time waiting on the network.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("deltapack-io")
            .enable_all()
            .build()
            .expect("a tokio runtime (threads and timers) starts")
    })
}

/// Runs `f` to completion on the I/O runtime, blocking the calling thread.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// The library error for a failed object-store call.
pub(crate) fn error(op: &'static str, url: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    let reason = match &e {
        E::NotFound { .. } => "not found: no such object, or no such bucket".to_string(),
        E::Precondition { .. } => "the object changed while it was being read; try again".to_string(),
        E::Unauthenticated { .. } | E::PermissionDenied { .. } => format!("{e}; {CREDENTIALS_HINT}"),
        _ => format!("{e}"),
    };
    Error::Remote {
        op,
        url: url.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_urls_are_told_apart() {
        assert!(matches!(Location::parse("ft.dpk").unwrap(), Location::Local(_)));
        assert!(matches!(Location::parse("./s3:/x").unwrap(), Location::Local(_)));
        let Location::Object(o) = Location::parse("file:///tmp/x/ft.dpk").unwrap() else {
            panic!("a file URL is an object")
        };
        assert_eq!(o.key.as_ref(), "tmp/x/ft.dpk");
        let Location::Object(o) = Location::parse("s3://bucket/a/b.dpk").unwrap() else {
            panic!("an s3 URL is an object")
        };
        assert_eq!(o.key.as_ref(), "a/b.dpk");
        assert!(is_url(Path::new("s3://b/k")) && !is_url(Path::new("/tmp/k")));
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        for (url, says) in [
            ("s3:///key", "names no bucket"),
            ("file://relative/x", "absolute"),
            ("gs://b/k", "does not read"),
            ("s3://b/a/../k", "not a valid object key"),
        ] {
            let e = Location::parse(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}
