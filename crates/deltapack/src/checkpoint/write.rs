//! Atomic outputs: everything is written under a temporary name next to the destination
//! and renamed into place only when complete, so a failure never leaves partial output.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::read::is_safe_rel_path;
use crate::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary sibling of `path`, unique within this machine's processes.
fn temp_sibling(path: &Path, what: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("output {} has no file name", path.display())))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{}.{what}-{}-{n}", name.to_string_lossy(), std::process::id());
    Ok(path.with_file_name(tmp))
}

/// Refuses an existing `path` (file, directory or link) unless `force`.
pub(crate) fn check_overwrite(path: &Path, force: bool) -> Result<()> {
    if !force && std::fs::symlink_metadata(path).is_ok() {
        return Err(Error::OutputExists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// A directory being written; it appears at its final path only on [`OutputDir::commit`].
pub struct OutputDir {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl OutputDir {
    /// Starts writing the directory `target`; fails if it exists and `force` is false.
    pub fn create(target: &Path, force: bool) -> Result<OutputDir> {
        check_overwrite(target, force)?;
        let staging = temp_sibling(target, "deltapack-tmp")?;
        std::fs::create_dir_all(&staging).map_err(|e| Error::io("creating", &staging, e))?;
        Ok(OutputDir {
            target: target.to_path_buf(),
            staging,
            committed: false,
        })
    }

    /// Creates a file at a relative path inside the directory (which must be a safe path).
    pub fn create_file(&self, rel: &str) -> Result<File> {
        if !is_safe_rel_path(rel) {
            return Err(Error::InvalidArgument(format!(
                "refusing to write outside the output directory: {rel}"
            )));
        }
        let path = self.staging.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
        }
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io("creating", self.target.join(rel), e))
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the finished directory into place, replacing an existing one (allowed by `force` at creation).
    pub fn commit(mut self) -> Result<()> {
        let backup = temp_sibling(&self.target, "deltapack-old")?;
        let had_old = std::fs::symlink_metadata(&self.target).is_ok();
        if had_old {
            std::fs::rename(&self.target, &backup).map_err(|e| Error::io("moving aside", &self.target, e))?;
        }
        if let Err(e) = std::fs::rename(&self.staging, &self.target) {
            if had_old {
                let _ = std::fs::rename(&backup, &self.target);
            }
            return Err(Error::io("renaming into place", &self.target, e));
        }
        self.committed = true;
        if had_old {
            let removed = if backup.is_dir() {
                std::fs::remove_dir_all(&backup)
            } else {
                std::fs::remove_file(&backup)
            };
            removed.map_err(|e| Error::io("removing the replaced output", &backup, e))?;
        }
        Ok(())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// A file being written; it appears at its final path only on [`OutputFile::commit`].
pub struct OutputFile {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<File>>,
}

impl OutputFile {
    /// Starts writing `target`; fails if it exists and `force` is false.
    pub fn create(target: &Path, force: bool) -> Result<OutputFile> {
        check_overwrite(target, force)?;
        if target.is_dir() {
            return Err(Error::InvalidArgument(format!("{} is a directory", target.display())));
        }
        let tmp = temp_sibling(target, "deltapack-tmp")?;
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io("creating", target, e))?;
        Ok(OutputFile {
            target: target.to_path_buf(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let f = self.file.as_mut().expect("file is open until commit");
        f.write_all(bytes).map_err(|e| Error::io("writing", &self.target, e))
    }

    /// Flushes, optionally syncs to disk, and renames into place.
    pub fn commit(mut self, sync: bool) -> Result<()> {
        let f = self.file.take().expect("file is open until commit");
        let f = f
            .into_inner()
            .map_err(|e| Error::io("writing", &self.target, e.into_error()))?;
        if sync {
            f.sync_all().map_err(|e| Error::io("syncing", &self.target, e))?;
        }
        drop(f);
        std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io("renaming into place", &self.target, e))?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_outputs_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        {
            let o = OutputDir::create(&target, false).unwrap();
            o.create_file("a/b.txt").unwrap();
        }
        {
            let mut f = OutputFile::create(&dir.path().join("f.dpk"), false).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn refuses_to_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"x").unwrap();
        assert!(matches!(
            OutputDir::create(&target, false),
            Err(Error::OutputExists { .. })
        ));
        let o = OutputDir::create(&target, true).unwrap();
        o.create_file("new").unwrap();
        o.commit().unwrap();
        assert!(target.join("new").exists() && !target.join("old").exists());
        assert!(o_escape_rejected(&target));
    }

    fn o_escape_rejected(dir: &Path) -> bool {
        let o = OutputDir::create(&dir.with_file_name("other"), false).unwrap();
        o.create_file("../evil").is_err() && o.create_file("/abs").is_err()
    }
}
