//! Atomic outputs: everything is written under a temporary name next to the destination
//! and renamed into place only when complete, so a failure never leaves partial output.
//!
//! The rules every command follows, whatever writes the output:
//! - an output never is, contains or lies inside one of the command's inputs
//!   ([`check_output_disjoint`]);
//! - missing parent directories of the output are created, and removed again if the
//!   command fails;
//! - an existing output is replaced only when forced, and a forced directory output replaces
//!   only a directory that holds nothing but files the command writes;
//! - temporaries are registered while they live, so a signal handler can remove them
//!   ([`remove_temporaries`]); temporaries that a dead process on this host left behind are
//!   removed by the next output written beside them.

use std::fs::File;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::relpath::is_safe_rel_path;
use crate::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Marks a temporary directory or file of ours; the host and process id that follow it let a
/// later run tell a dead process's leftovers from a live writer's.
const TMP_TAG: &str = ".deltapack-tmp-";
const OLD_TAG: &str = ".deltapack-old-";

/// The temporaries this process is writing, for [`remove_temporaries`].
static LIVE: Mutex<Live> = Mutex::new(Live {
    paths: Vec::new(),
    interrupted: false,
});

struct Live {
    paths: Vec<PathBuf>,
    /// Set by [`remove_temporaries`]: no new temporary may be created after it.
    interrupted: bool,
}

fn live() -> std::sync::MutexGuard<'static, Live> {
    // A panic while holding the lock leaves the list itself intact: keep using it.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers a temporary about to be created; refused once [`remove_temporaries`] ran.
fn register(path: &Path) -> Result<()> {
    let mut l = live();
    if l.interrupted {
        return Err(Error::io(
            "creating",
            path,
            std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted"),
        ));
    }
    l.paths.push(path.to_path_buf());
    Ok(())
}

fn unregister(path: &Path) {
    live().paths.retain(|p| p != path);
}

/// Removes every temporary file and directory this process is writing, and refuses new
/// ones. For a signal handler (run on an ordinary thread, as the `ctrlc` crate does) before
/// the process exits: the outputs in progress then leave nothing behind.
pub fn remove_temporaries() {
    let mut l = live();
    l.interrupted = true;
    for p in l.paths.drain(..) {
        remove_any(&p);
    }
}

/// Removes a file or a directory tree, ignoring errors (cleanup is best effort).
fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// This machine's host name, reduced to characters safe in a file name.
fn host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let raw = host_name().unwrap_or_default();
        let safe: String = raw
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(40)
            .collect();
        if safe.is_empty() {
            "host".into()
        } else {
            safe
        }
    })
}

#[cfg(unix)]
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its length; gethostname writes at most that
    // many bytes and we read only up to the first NUL within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

#[cfg(not(unix))]
fn host_name() -> Option<String> {
    std::env::var("COMPUTERNAME").ok()
}

/// Whether process `pid` of this host is still running.
#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Without a way to ask, every process counts as alive, so nothing is removed.
#[cfg(not(unix))]
fn process_alive(_pid: u32) -> bool {
    true
}

/// The host and process id in a temporary's name `.NAME.deltapack-tmp-HOST-PID-N`.
fn temp_owner(file_name: &str) -> Option<(&str, u32)> {
    let (_, tail) = file_name.rsplit_once(TMP_TAG)?;
    let mut parts = tail.rsplitn(3, '-');
    let _n: u64 = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    Some((parts.next()?, pid))
}

/// Removes the temporaries in `dir` that a process of this host left behind when it died
/// (killed, or the machine lost power). Those of other hosts are kept: on a shared file
/// system their process ids mean nothing here.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with('.') {
            continue;
        }
        match temp_owner(name) {
            Some((h, pid)) if h == host() && pid != std::process::id() && !process_alive(pid) => remove_any(&e.path()),
            _ => {}
        }
    }
}

/// A temporary sibling of `path`, unique within this machine's processes.
fn temp_sibling(path: &Path, tag: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("output {} has no file name", path.display())))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{}{tag}{}-{}-{n}", name.to_string_lossy(), host(), std::process::id());
    Ok(path.with_file_name(tmp))
}

/// Creates the missing ancestors of `path`; returns those it created, outermost first.
fn create_parents(path: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut p = path.parent();
    while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
        if std::fs::symlink_metadata(dir).is_ok() {
            break;
        }
        missing.push(dir.to_path_buf());
        p = dir.parent();
    }
    missing.reverse();
    for d in &missing {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                remove_created(&missing);
                return Err(Error::io("creating", d, e));
            }
        }
    }
    Ok(missing)
}

/// Removes directories [`create_parents`] made, innermost first, where still empty.
fn remove_created(dirs: &[PathBuf]) {
    for d in dirs.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
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

/// `path` made absolute with links resolved, as far as it exists; the rest is appended
/// with `.` and `..` resolved lexically.
fn resolve(path: &Path) -> PathBuf {
    let abs = match std::path::absolute(path) {
        Ok(p) => p,
        Err(_) => path.to_path_buf(),
    };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other.as_os_str()),
                }
            }
            return out;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return abs,
        }
    }
}

/// Refuses an output that is, contains or lies inside one of the inputs, whatever forcing
/// says: a command never writes into what it reads. `inputs` pairs each input's role
/// ("base", "delta", ...) with its path; inputs that do not exist are skipped.
pub fn check_output_disjoint(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = resolve(out);
    for (role, input) in inputs {
        if std::fs::symlink_metadata(input).is_err() {
            continue;
        }
        let i = resolve(input);
        let how = if o == i {
            "is"
        } else if o.starts_with(&i) {
            "lies inside"
        } else if i.starts_with(&o) {
            "contains"
        } else {
            continue;
        };
        return Err(Error::InvalidArgument(format!(
            "the output {} {how} the {role} {}; deltapack never writes into its inputs: choose another output path",
            out.display(),
            input.display()
        )));
    }
    Ok(())
}

/// The files below `old` (relative paths) that `new` does not hold: what replacing `old` by
/// `new` would delete although the command does not write it.
fn foreign_files(old: &Path, new: &dyn Fn(&str) -> bool) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, new: &dyn Fn(&str) -> bool, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            out.push(if prefix.is_empty() { ".".into() } else { prefix.into() });
            return;
        };
        for e in entries.flatten() {
            let rel = format!("{prefix}{}", e.file_name().to_string_lossy());
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path(), &format!("{rel}/"), new, out),
                _ if new(&rel) => {}
                _ => out.push(rel),
            }
        }
    }
    let mut out = Vec::new();
    match std::fs::symlink_metadata(old) {
        Ok(m) if m.is_dir() => walk(old, "", new, &mut out),
        Ok(_) => out.push(old.display().to_string()),
        Err(_) => {}
    }
    out.sort();
    out
}

/// The error for a forced directory output over a directory holding other files.
fn foreign_error(target: &Path, foreign: &[String]) -> Error {
    let shown: Vec<&str> = foreign.iter().take(5).map(String::as_str).collect();
    let more = match foreign.len() {
        n if n > shown.len() => format!(" and {} more", n - shown.len()),
        _ => String::new(),
    };
    Error::InvalidArgument(format!(
        "{} holds files this command would not write ({}{more}); replacing it would delete them: move them away or choose another output directory",
        target.display(),
        shown.join(", ")
    ))
}

/// A directory being written; it appears at its final path only on [`OutputDir::commit`].
pub struct OutputDir {
    target: PathBuf,
    staging: PathBuf,
    /// Parent directories created for it, removed again unless committed.
    created: Vec<PathBuf>,
    committed: bool,
}

impl OutputDir {
    /// Starts writing the directory `target`; fails if it exists and `force` is false.
    pub fn create(target: &Path, force: bool) -> Result<OutputDir> {
        Self::create_expecting(target, force, None)
    }

    /// [`OutputDir::create`] that, when `force` replaces an existing directory, first checks
    /// it holds only files of `expected` (relative paths the command will write), so a refusal
    /// comes before the work rather than at [`OutputDir::commit`], which checks again.
    pub fn create_expecting(target: &Path, force: bool, expected: Option<&[&str]>) -> Result<OutputDir> {
        check_overwrite(target, force)?;
        if let Some(expected) = expected {
            let foreign = foreign_files(target, &|rel| expected.contains(&rel));
            if !foreign.is_empty() {
                return Err(foreign_error(target, &foreign));
            }
        }
        let staging = temp_sibling(target, TMP_TAG)?;
        let created = create_parents(&staging)?;
        if let Some(dir) = staging.parent() {
            remove_stale_temporaries(dir);
        }
        let dir = OutputDir {
            target: target.to_path_buf(),
            staging,
            created,
            committed: false,
        };
        register(&dir.staging)?;
        std::fs::create_dir(&dir.staging).map_err(|e| Error::io("creating", &dir.staging, e))?;
        Ok(dir)
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

    /// Moves the finished directory into place, replacing an existing one (allowed by
    /// `force` at creation) only if it holds nothing but files the new one holds.
    pub fn commit(mut self) -> Result<()> {
        let staging = self.staging.clone();
        let foreign = foreign_files(&self.target, &|rel| staging.join(rel).is_file());
        if !foreign.is_empty() {
            return Err(foreign_error(&self.target, &foreign));
        }
        let backup = temp_sibling(&self.target, OLD_TAG)?;
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
        unregister(&self.staging);
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
            unregister(&self.staging);
            remove_created(&self.created);
        }
    }
}

/// A file being written; it appears at its final path only on [`OutputFile::commit`].
pub struct OutputFile {
    target: PathBuf,
    tmp: PathBuf,
    /// Parent directories created for it, removed again unless committed.
    created: Vec<PathBuf>,
    file: Option<std::io::BufWriter<File>>,
}

impl OutputFile {
    /// Starts writing `target`; fails if it exists and `force` is false.
    pub fn create(target: &Path, force: bool) -> Result<OutputFile> {
        check_overwrite(target, force)?;
        if target.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{} is a directory, not a file",
                target.display()
            )));
        }
        let tmp = temp_sibling(target, TMP_TAG)?;
        let created = create_parents(&tmp)?;
        if let Some(dir) = tmp.parent() {
            remove_stale_temporaries(dir);
        }
        let mut out = OutputFile {
            target: target.to_path_buf(),
            tmp,
            created,
            file: None,
        };
        register(&out.tmp)?;
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&out.tmp)
            .map_err(|e| Error::io("creating", target, e))?;
        out.file = Some(std::io::BufWriter::with_capacity(1 << 20, file));
        Ok(out)
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
        unregister(&self.tmp);
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
            unregister(&self.tmp);
            remove_created(&self.created);
        }
    }
}

/// A working directory beside an output (so on its file system), for a model rebuilt on the
/// way to it; removed when dropped, and by [`remove_temporaries`] on a signal.
pub(crate) struct ScratchDir {
    path: PathBuf,
    created: Vec<PathBuf>,
}

impl ScratchDir {
    /// Creates an empty directory beside `out`, and `out`'s missing parents; for an output
    /// in an object store, in the system's temporary directory (`TMPDIR`).
    pub(crate) fn beside(out: &Path) -> Result<ScratchDir> {
        let local;
        let out = match crate::remote::is_url(out) {
            true => {
                local = std::env::temp_dir().join(out.file_name().unwrap_or("delta".as_ref()));
                &local
            }
            false => out,
        };
        let path = temp_sibling(out, TMP_TAG)?;
        let created = create_parents(&path)?;
        if let Some(dir) = path.parent() {
            remove_stale_temporaries(dir);
        }
        let dir = ScratchDir { path, created };
        register(&dir.path)?;
        std::fs::create_dir(&dir.path).map_err(|e| Error::io("creating", &dir.path, e))?;
        Ok(dir)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        unregister(&self.path);
        // The output beside it keeps the parents it needs; only empty ones go.
        remove_created(&self.created);
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
        std::fs::create_dir(target.join("sub")).unwrap();
        std::fs::write(target.join("sub/file"), b"old").unwrap();
        assert!(matches!(
            OutputDir::create(&target, false),
            Err(Error::OutputExists { .. })
        ));
        let o = OutputDir::create(&target, true).unwrap();
        o.create_file("sub/file").unwrap().write_all(b"new").unwrap();
        o.create_file("more").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(target.join("sub/file")).unwrap(), b"new");
        assert!(target.join("more").exists());
        assert!(o_escape_rejected(&target));
    }

    #[test]
    fn forced_directory_output_keeps_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("model.safetensors"), b"old").unwrap();
        std::fs::write(target.join("notes.txt"), b"mine").unwrap();
        let err = OutputDir::create_expecting(&target, true, Some(&["model.safetensors"]))
            .err()
            .expect("refused before any work");
        assert!(err.to_string().contains("notes.txt"), "{err}");
        let o = OutputDir::create(&target, true).unwrap();
        o.create_file("model.safetensors").unwrap();
        let err = o.commit().unwrap_err();
        assert!(err.to_string().contains("notes.txt"), "{err}");
        assert_eq!(std::fs::read(target.join("notes.txt")).unwrap(), b"mine");
        assert_eq!(std::fs::read(target.join("model.safetensors")).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporaries left");
    }

    #[test]
    fn missing_parents_are_created_and_removed_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b/out.dpk");
        {
            let mut f = OutputFile::create(&target, false).unwrap();
            f.write_all(b"partial").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut f = OutputFile::create(&target, false).unwrap();
        f.write_all(b"whole").unwrap();
        f.commit(false).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        let d = OutputDir::create(&dir.path().join("x/y"), false).unwrap();
        drop(d);
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn outputs_never_overlap_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::create_dir(&base).unwrap();
        let inputs = [("base", base.as_path())];
        for bad in [
            base.clone(),
            base.join("out"),
            base.join("x/../y"),
            dir.path().to_path_buf(),
        ] {
            let e = check_output_disjoint(&bad, &inputs).unwrap_err();
            assert!(e.to_string().contains("never writes into its inputs"), "{e}");
        }
        let relative = base.join("..").join("base");
        assert!(check_output_disjoint(&relative, &inputs).is_err());
        assert!(check_output_disjoint(&dir.path().join("base2"), &inputs).is_ok());
        assert!(check_output_disjoint(&dir.path().join("new/out"), &inputs).is_ok());
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        let mut dead = dead;
        dead.wait().unwrap();
        let stale = dir.path().join(format!(".m.dpk{TMP_TAG}{}-{dead_pid}-0", host()));
        let live = dir
            .path()
            .join(format!(".m.dpk{TMP_TAG}{}-{}-9", host(), std::process::id()));
        let other_host = dir.path().join(format!(".m.dpk{TMP_TAG}elsewhere-{dead_pid}-0"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("x"), b"x").unwrap();
        std::fs::write(&live, b"x").unwrap();
        std::fs::write(&other_host, b"x").unwrap();
        let f = OutputFile::create(&dir.path().join("new.dpk"), false).unwrap();
        assert!(!stale.exists(), "a dead process's temporary is removed");
        assert!(live.exists() && other_host.exists());
        drop(f);
    }

    #[test]
    fn temporaries_are_registered_while_they_live() {
        // remove_temporaries itself refuses every later output of the process, so the CLI's
        // signal tests exercise it in a child process; here, the registry it empties.
        let dir = tempfile::tempdir().unwrap();
        let f = OutputFile::create(&dir.path().join("t.dpk"), false).unwrap();
        assert!(live().paths.contains(&f.tmp));
        assert_eq!(
            temp_owner(&f.tmp.file_name().unwrap().to_string_lossy()).map(|o| o.1),
            Some(std::process::id())
        );
        drop(f);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    fn o_escape_rejected(dir: &Path) -> bool {
        let o = OutputDir::create(&dir.with_file_name("other"), false).unwrap();
        o.create_file("../evil").is_err() && o.create_file("/abs").is_err()
    }
}
