//! Finding a model in the local Hugging Face hub cache, offline.
//!
//! Written by hand: `hf-hub` 1.0 is an async download client (reqwest, tokio), far too heavy
//! for reading a directory layout. The layout is `models--{org}--{name}/refs/{revision}`
//! (a file holding a commit hash) and `models--{org}--{name}/snapshots/{commit}/`.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A model found in the hub cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// The snapshot directory.
    pub path: PathBuf,
    /// `ORG/NAME@COMMIT`, suitable as a base ID.
    pub id: String,
}

/// The hub cache directory, as the Hugging Face libraries choose it.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|x| x.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// Parses `ORG/NAME` or `ORG/NAME@REVISION`; `None` if `arg` is not of that form.
pub fn parse_id(arg: &str) -> Option<(&str, &str, &str)> {
    let (repo, rev) = arg.split_once('@').unwrap_or((arg, "main"));
    let (org, name) = repo.split_once('/')?;
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && s != "..";
    let rev_ok =
        !rev.is_empty() && rev.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) && !rev.contains("..");
    (ok(org) && ok(name) && rev_ok).then_some((org, name, rev))
}

/// Looks `ORG/NAME[@REVISION]` up in the cache at `cache`.
pub fn find(cache: &Path, arg: &str) -> Result<HubModel> {
    let (org, name, rev) =
        parse_id(arg).ok_or_else(|| Error::InvalidArgument(format!("'{arg}' is not ORG/NAME[@REVISION]")))?;
    let repo = cache.join(format!("models--{org}--{name}"));
    let commit = if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        rev.to_string()
    } else {
        let r = repo.join("refs").join(rev);
        std::fs::read_to_string(&r)
            .map(|s| s.trim().to_string())
            .map_err(|_| not_found(arg, cache))?
    };
    if commit.len() != 40 || !commit.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::bad_checkpoint(
            repo.join("refs").join(rev),
            "does not hold a commit hash",
        ));
    }
    let path = repo.join("snapshots").join(&commit);
    if !path.is_dir() {
        return Err(not_found(arg, cache));
    }
    Ok(HubModel {
        path,
        id: format!("{org}/{name}@{commit}"),
    })
}

fn not_found(arg: &str, cache: &Path) -> Error {
    Error::InvalidArgument(format!(
        "'{arg}' is neither a path nor a model in the Hugging Face cache at {}; download it first \
         (e.g. `huggingface-cli download {}`) or give its directory",
        cache.display(),
        arg.split('@').next().unwrap_or(arg)
    ))
}

/// Resolves a checkpoint argument: an existing path as it is, else a hub ID from the cache.
///
/// Returns the path and, for hub IDs, the `ORG/NAME@COMMIT` identity.
pub fn resolve(arg: &Path) -> Result<(PathBuf, Option<String>)> {
    if arg.exists() || crate::remote::is_url(arg) {
        return Ok((arg.to_path_buf(), None));
    }
    let Some(s) = arg.to_str().filter(|s| parse_id(s).is_some()) else {
        return Ok((arg.to_path_buf(), None)); // opening it reports the missing path
    };
    let cache = cache_dir().ok_or_else(|| {
        Error::InvalidArgument(format!("'{s}' does not exist and no Hugging Face cache is configured"))
    })?;
    let m = find(&cache, s)?;
    Ok((m.path, Some(m.id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_rejects_paths() {
        assert_eq!(parse_id("Qwen/Qwen2.5-0.5B"), Some(("Qwen", "Qwen2.5-0.5B", "main")));
        assert_eq!(parse_id("org/m@v1.0"), Some(("org", "m", "v1.0")));
        for bad in [
            "model",
            "/abs/path",
            "a/b/c",
            "../x",
            "org/..",
            "org/m@../../etc",
            "org/m@",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn finds_snapshots_by_ref_and_by_commit() {
        let cache = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.path().join("models--org--base");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        let by_ref = find(cache.path(), "org/base").unwrap();
        assert_eq!(by_ref.id, format!("org/base@{commit}"));
        assert_eq!(find(cache.path(), &format!("org/base@{commit}")).unwrap(), by_ref);
        let err = find(cache.path(), "org/other").unwrap_err().to_string();
        assert!(err.contains("huggingface-cli download org/other"), "{err}");
        assert!(find(cache.path(), "org/base@v2").is_err());
    }
}
