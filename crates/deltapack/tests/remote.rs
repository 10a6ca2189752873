//! Deltas and checkpoints at `file://` URLs: the object-store code path (ranged reads pinned
//! by ETag, read-ahead, uploads, the checkpoint cache) without a server. The same code against
//! a real S3-compatible server is tested in `crates/deltapack-py/tests/test_remote.py`.

mod common;

use std::path::{Path, PathBuf};

use common::{files, small_pair};
use deltapack::container::Delta;
use deltapack::progress::NoProgress;
use deltapack::{apply, make, rebuild_tensor, verify, ApplyOptions, Chain, MakeOptions};

fn url(p: &Path) -> PathBuf {
    PathBuf::from(format!("file://{}", p.display()))
}

fn opts() -> MakeOptions {
    MakeOptions {
        chunk_bytes: 1 << 12,
        ..Default::default()
    }
}

#[test]
fn a_delta_at_a_url_rebuilds_what_the_file_does() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let local = dir.path().join("local.dpk");
    let remote = dir.path().join("remote.dpk");
    make(&base, &ft, &local, &opts(), &NoProgress).unwrap();
    make(&base, &ft, &url(&remote), &opts(), &NoProgress).unwrap();
    assert_eq!(std::fs::read(&local).unwrap(), std::fs::read(&remote).unwrap());
    // Uploads never overwrite without force.
    let again = make(&base, &ft, &url(&remote), &opts(), &NoProgress);
    assert!(matches!(again, Err(deltapack::Error::OutputExists { .. })), "{again:?}");

    let out = dir.path().join("out");
    apply(&base, &url(&remote), &out, &ApplyOptions::default(), &NoProgress).unwrap();
    assert_eq!(files(&out), files(&ft));
    verify(&base, &url(&remote), Some(&ft), &NoProgress).unwrap();

    // Reading the index fetches no payload; a whole rebuild fetches the file once.
    let d = Delta::open(&url(&remote)).unwrap();
    let size = std::fs::metadata(&remote).unwrap().len();
    let (requests, bytes) = d.fetched().unwrap();
    assert!(
        requests <= 3,
        "{requests}: trailer, then header and index (together when close)"
    );
    assert!(bytes < size / 2, "{bytes} of {size}");

    // One tensor: its chunks, nothing else.
    let chain = Chain::open(&base, &[url(&remote)]).unwrap();
    let t = chain.deltas[0]
        .index
        .tensors()
        .max_by_key(|t| t.stored_bytes())
        .unwrap()
        .clone();
    let before = chain.deltas[0].fetched().unwrap();
    let local_chain = Chain::open(&base, std::slice::from_ref(&local)).unwrap();
    assert_eq!(
        rebuild_tensor(&chain, &t.name).unwrap(),
        rebuild_tensor(&local_chain, &t.name).unwrap()
    );
    let after = chain.deltas[0].fetched().unwrap();
    assert!(
        after.1 - before.1 <= t.stored_bytes() + 4096,
        "{after:?} {before:?} {}",
        t.stored_bytes()
    );
    assert!(after.0 - before.0 <= t.chunks.len() as u64 + 1);
}

#[test]
fn a_delta_replaced_while_read_is_an_error_not_a_mix() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let remote = dir.path().join("remote.dpk");
    make(&base, &ft, &url(&remote), &opts(), &NoProgress).unwrap();
    let chain = Chain::open(&base, &[url(&remote)]).unwrap();
    // Another writer replaces the object (same size, other bytes) after it was opened.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut bytes = std::fs::read(&remote).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&remote, &bytes).unwrap();
    let name = chain.deltas[0]
        .index
        .tensors()
        .find(|t| t.stored_bytes() > 0)
        .unwrap()
        .name
        .clone();
    let e = rebuild_tensor(&chain, &name).unwrap_err().to_string();
    assert!(e.contains("changed while it was being read"), "{e}");
}

#[test]
fn a_checkpoint_at_a_url_is_fetched_once_into_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let cache = dir.path().join("cache");
    std::env::set_var("DELTAPACK_CACHE_DIR", &cache);
    let delta = dir.path().join("d.dpk");
    make(&url(&base), &url(&ft), &delta, &opts(), &NoProgress).unwrap();
    let out = dir.path().join("out");
    apply(&url(&base), &delta, &out, &ApplyOptions::default(), &NoProgress).unwrap();
    assert_eq!(files(&out), files(&ft));
    let fetched: Vec<_> = std::fs::read_dir(cache.join("checkpoints")).unwrap().collect();
    assert_eq!(fetched.len(), 2, "base and fine-tune, once each");
}

#[test]
fn a_base_at_a_url_is_read_by_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = small_pair(dir.path());
    let delta = dir.path().join("d.dpk");
    make(&base, &ft, &delta, &opts(), &NoProgress).unwrap();
    // No cache entry for this URL: the chain reads the base lazily, tensor by tensor.
    let chain = Chain::open(&url(&base), std::slice::from_ref(&delta)).unwrap();
    let local = Chain::open(&base, std::slice::from_ref(&delta)).unwrap();
    for name in ["w", "b"] {
        assert_eq!(
            rebuild_tensor(&chain, name).unwrap(),
            rebuild_tensor(&local, name).unwrap()
        );
    }
    let out = dir.path().join("out");
    deltapack::rebuild_chain(&chain, &out, &ApplyOptions::default(), &NoProgress).unwrap();
    assert_eq!(files(&out), files(&ft));
}
