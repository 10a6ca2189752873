//! Opening a checkpoint: one `.safetensors` file, or a model directory with one file or
//! shards listed by `model.safetensors.index.json`, plus the directory's other files.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};
use safetensors::Dtype;

use super::header;
use crate::relpath::is_safe_rel_path;
use crate::{Error, Result};

const INDEX_FILE: &str = "model.safetensors.index.json";
/// Files that may hold pickled Python objects: never read, reported as skipped.
const PICKLE_EXTENSIONS: [&str; 6] = ["bin", "pt", "pth", "pkl", "pickle", "ckpt"];

/// One safetensors file of a checkpoint: memory-mapped, or held in memory by the caller.
pub struct Shard {
    /// Path relative to the checkpoint root, with `/` separators.
    pub rel: String,
    /// Path on disk (for a checkpoint in memory, the label it was given joined with `rel`,
    /// used only in messages).
    pub path: PathBuf,
    /// Bytes before the data section (8-byte length plus JSON header).
    pub prefix_len: usize,
    data: ShardData,
}

/// The bytes of one tensor held in memory by whoever built a [`Checkpoint::from_memory`]
/// (a Python tensor's buffer, say); they must not change while the checkpoint is in use.
pub type TensorBytes = Box<dyn AsRef<[u8]> + Send + Sync>;

enum ShardData {
    /// A file, memory-mapped whole (header and data).
    Mapped(Mmap),
    /// A header built in memory, and each tensor's bytes apart, by data offset.
    Memory {
        header: Vec<u8>,
        tensors: Vec<(usize, TensorBytes)>,
    },
}

impl Shard {
    /// The header exactly as stored: the 8-byte length and the JSON.
    pub fn header_bytes(&self) -> &[u8] {
        match &self.data {
            ShardData::Mapped(map) => &map[..self.prefix_len],
            ShardData::Memory { header, .. } => header,
        }
    }

    /// The shard's size in bytes, as a file.
    fn len(&self) -> u64 {
        match &self.data {
            ShardData::Mapped(map) => map.len() as u64,
            ShardData::Memory { header, tensors } => {
                header.len() as u64 + tensors.iter().map(|(_, b)| (**b).as_ref().len() as u64).sum::<u64>()
            }
        }
    }

    /// Bytes `range` of the data section; for a shard in memory, `range` lies within one
    /// tensor (as every tensor's does).
    fn data(&self, range: std::ops::Range<usize>) -> &[u8] {
        match &self.data {
            ShardData::Mapped(map) => &map[self.prefix_len + range.start..self.prefix_len + range.end],
            ShardData::Memory { tensors, .. } => {
                let i = tensors.partition_point(|(start, _)| *start <= range.start) - 1;
                let (start, bytes) = &tensors[i];
                &(**bytes).as_ref()[range.start - start..range.end - start]
            }
        }
    }
}

/// A tensor handed to [`Checkpoint::from_memory`].
pub struct MemoryTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Its bytes, little-endian and contiguous, `shape` x the dtype's size long.
    pub bytes: TensorBytes,
}

/// Where a tensor lives in a checkpoint.
#[derive(Debug, Clone)]
pub struct TensorRef {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Index of its shard in [`Checkpoint::shards`].
    pub shard: usize,
    /// Byte range within the shard's data section, as the header states it.
    pub data_offsets: (usize, usize),
}

impl TensorRef {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.data_offsets.1 - self.data_offsets.0
    }

    /// True for a tensor without elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A non-weight file of a model directory (config, tokenizer, ...).
#[derive(Debug, Clone)]
pub struct AuxFile {
    /// Path relative to the checkpoint root, with `/` separators.
    pub rel: String,
    /// Path on disk.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

/// A file that was deliberately not read, and why.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Skipped {
    /// Path relative to the checkpoint root.
    pub path: String,
    /// Why it was skipped.
    pub reason: String,
}

/// An opened checkpoint: its shards (memory-mapped), tensors and other files.
pub struct Checkpoint {
    /// The path given to [`Checkpoint::open`].
    pub root: PathBuf,
    /// Safetensors files, in the order tensors are listed.
    pub shards: Vec<Shard>,
    /// Every tensor, by shard and then by data offset.
    pub tensors: Vec<TensorRef>,
    /// Non-weight files (empty when a single file was given).
    pub aux: Vec<AuxFile>,
    /// Files not read (pickles, special files).
    pub skipped: Vec<Skipped>,
    by_name: HashMap<String, usize>,
    /// The temporary directory a checkpoint fetched from a URL lies in (cache off).
    _fetched: Option<tempfile::TempDir>,
    /// The object store a checkpoint opened by [`Checkpoint::open_lazy`] is read from.
    pub(super) lazy: Option<super::lazy::Lazy>,
}

impl Checkpoint {
    /// Opens a `.safetensors` file or a model directory.
    ///
    /// A directory with `model.safetensors.index.json` uses the shards the index names (a
    /// missing shard is an error); otherwise every top-level `*.safetensors` file is a shard.
    /// All other files below the directory, except hidden ones and pickles, are auxiliary.
    ///
    /// `path` may be a URL (`s3://BUCKET/PREFIX/` of a model's files, or of one `.safetensors`
    /// object): it is then fetched into the local cache first (see [`crate::remote::fetch_checkpoint`]).
    pub fn open(path: &Path) -> Result<Checkpoint> {
        if crate::remote::is_url(path) {
            let fetched = crate::remote::fetch_checkpoint(path)?;
            let mut ck = Self::open(&fetched.path)?;
            ck._fetched = fetched.temporary;
            return Ok(ck);
        }
        let meta = std::fs::metadata(path).map_err(|e| Error::io("opening checkpoint", path, e))?;
        if meta.is_file() {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::bad_checkpoint(path, "file name is not valid UTF-8"))?
                .to_string();
            let shard = open_shard(path, name)?;
            return Checkpoint::assemble(path, vec![shard], Vec::new(), Vec::new());
        }
        let shard_names = shard_names(path)?;
        if shard_names.is_empty() {
            return Err(Error::bad_checkpoint(path, no_safetensors_reason(path)));
        }
        let shards = shard_names
            .iter()
            .map(|n| open_shard(&path.join(n), n.clone()))
            .collect::<Result<Vec<_>>>()?;
        let (aux, skipped) = list_aux(path, &shard_names)?;
        let ck = Checkpoint::assemble(path, shards, aux, skipped)?;
        ck.check_index(path)?;
        Ok(ck)
    }

    /// A checkpoint of tensors held in memory (a training process's state dict, say), as
    /// one shard `model.safetensors` laid out as the safetensors writers lay it out (by
    /// dtype, widest first, then by name) with `metadata` as its `__metadata__`; and with
    /// the non-weight files of `files` (a model directory: config, tokenizer; its
    /// `.safetensors` files and shard index are left out) as its other files.
    ///
    /// `label` names the checkpoint in messages. Every tensor's byte length must match its
    /// dtype and shape, and names must be distinct.
    pub fn from_memory(
        label: &Path,
        mut tensors: Vec<MemoryTensor>,
        metadata: Option<serde_json::Value>,
        files: Option<&Path>,
    ) -> Result<Checkpoint> {
        const SHARD: &str = "model.safetensors";
        tensors.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
        for w in tensors.windows(2) {
            if w[0].name == w[1].name {
                return Err(Error::bad_tensor(label, &w[0].name, "given twice"));
            }
        }
        let mut layout = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let len = (*t.bytes).as_ref().len();
            if crate::dtype::byte_len(t.dtype, &t.shape) != Some(len) {
                return Err(Error::bad_tensor(
                    label,
                    &t.name,
                    format!("{len} bytes do not hold a {:?} tensor of shape {:?}", t.dtype, t.shape),
                ));
            }
            layout.push((t.name.as_str(), t.dtype, t.shape.as_slice()));
        }
        let (header, _) = header::build(metadata, &layout)?;
        let mut offset = 0;
        let mut data = Vec::with_capacity(tensors.len());
        for t in tensors {
            let len = (*t.bytes).as_ref().len();
            data.push((offset, t.bytes));
            offset += len;
        }
        let shard = Shard {
            rel: SHARD.into(),
            path: label.join(SHARD),
            prefix_len: header.len(),
            data: ShardData::Memory { header, tensors: data },
        };
        let (aux, skipped) = match files {
            Some(dir) => {
                let (aux, skipped) = list_aux(dir, &[])?;
                let weights = |rel: &str| rel.ends_with(".safetensors") || rel == INDEX_FILE;
                (aux.into_iter().filter(|a| !weights(&a.rel)).collect(), skipped)
            }
            None => (Vec::new(), Vec::new()),
        };
        Checkpoint::assemble(label, vec![shard], aux, skipped)
    }

    fn assemble(root: &Path, shards: Vec<Shard>, aux: Vec<AuxFile>, skipped: Vec<Skipped>) -> Result<Checkpoint> {
        let mut tensors = Vec::new();
        let mut by_name = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let h = header::parse(shard.header_bytes(), Some(shard.len()))
                .map_err(|r| Error::bad_checkpoint(&shard.path, r))?;
            for t in h.tensors {
                if by_name.insert(t.name.clone(), tensors.len()).is_some() {
                    return Err(Error::bad_tensor(
                        &shard.path,
                        &t.name,
                        "tensor appears in more than one shard",
                    ));
                }
                tensors.push(TensorRef {
                    name: t.name,
                    dtype: t.dtype,
                    shape: t.shape,
                    shard: i,
                    data_offsets: t.data_offsets,
                });
            }
        }
        Ok(Checkpoint {
            root: root.to_path_buf(),
            shards,
            tensors,
            aux,
            skipped,
            by_name,
            _fetched: None,
            lazy: None,
        })
    }

    /// Every tensor the index maps must be in the shard it names.
    fn check_index(&self, dir: &Path) -> Result<()> {
        let Some(map) = read_index(dir)? else {
            return Ok(());
        };
        for (tensor, file) in map {
            match self.tensor(&tensor) {
                Some(t) if self.shards[t.shard].rel == file => {}
                Some(_) => {
                    return Err(Error::bad_tensor(
                        dir.join(INDEX_FILE),
                        &tensor,
                        format!("index says it is in {file}, but it is elsewhere"),
                    ))
                }
                None => {
                    return Err(Error::bad_tensor(
                        dir.join(INDEX_FILE),
                        &tensor,
                        format!("index names it but {file} does not hold it"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorRef> {
        self.index_of(name).map(|i| &self.tensors[i])
    }

    /// The position of a tensor in [`Checkpoint::tensors`].
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The bytes of a tensor (memory-mapped; touching them faults pages in).
    pub fn bytes(&self, t: &TensorRef) -> &[u8] {
        self.shards[t.shard].data(t.data_offsets.0..t.data_offsets.1)
    }

    /// Tells the kernel that `range` of a tensor's bytes will not be needed again soon, so
    /// the pages stop counting towards this process's resident memory.
    pub fn release(&self, t: &TensorRef, range: std::ops::Range<usize>) {
        let shard = &self.shards[t.shard];
        let ShardData::Mapped(map) = &shard.data else {
            return;
        };
        if range.is_empty() {
            return;
        }
        let start = shard.prefix_len + t.data_offsets.0 + range.start;
        // SAFETY: the mapping is read-only and private, and never written through, so
        // MADV_DONTNEED only drops clean page-cache pages from our page tables; any later
        // read faults the same file contents back in. No Rust reference observes a change.
        // A failure only means the pages stay resident, so it is ignored.
        let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, range.len()) };
    }

    /// Total size of all shards in bytes.
    pub fn weight_bytes(&self) -> u64 {
        self.shards.iter().map(Shard::len).sum()
    }
}

fn open_shard(path: &Path, rel: String) -> Result<Shard> {
    let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    // SAFETY: the map is read-only. If another process truncates the file while we read it,
    // accesses past the new end raise SIGBUS; that is the documented limit of mapping files
    // (checkpoints are not expected to change while deltapack reads them).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("memory-mapping", path, e))?;
    let _ = map.advise(Advice::Sequential);
    let n = header::json_len(&map).map_err(|r| Error::bad_checkpoint(path, r))?;
    if 8 + n > map.len() as u64 {
        return Err(Error::bad_checkpoint(path, "file ends inside its header"));
    }
    Ok(Shard {
        rel,
        path: path.to_path_buf(),
        prefix_len: 8 + n as usize,
        data: ShardData::Mapped(map),
    })
}

/// Reads `weight_map` of the index file, if there is one.
fn read_index(dir: &Path) -> Result<Option<BTreeMap<String, String>>> {
    let path = dir.join(INDEX_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let idx: Index = serde_json::from_str(&text)
        .map_err(|e| Error::bad_checkpoint(&path, format!("not a valid shard index: {e}")))?;
    Ok(Some(idx.weight_map))
}

/// Why a directory without `.safetensors` files is no checkpoint, and what to do: a
/// PyTorch pickle checkpoint is named, with the one-line conversion to safetensors.
fn no_safetensors_reason(dir: &Path) -> String {
    let pickles: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            let ext = n
                .rsplit_once('.')
                .map(|(_, e)| e.to_ascii_lowercase())
                .unwrap_or_default();
            !n.starts_with('.') && PICKLE_EXTENSIONS.contains(&ext.as_str())
        })
        .collect();
    if pickles.is_empty() {
        return "no .safetensors file found; give a model directory or a .safetensors file".into();
    }
    format!(
        "no .safetensors file found, only {} (pickle format); deltapack never reads pickles, since loading one can run arbitrary code. Convert the checkpoint once, where you trust it, with transformers: `AutoModel.from_pretrained(\"{}\").save_pretrained(\"OUT\", safe_serialization=True)` (or safetensors.torch.save_file on its state dict)",
        pickles.join(", "),
        dir.display()
    )
}

fn shard_names(dir: &Path) -> Result<Vec<String>> {
    if let Some(map) = read_index(dir)? {
        let mut names: Vec<String> = map.into_values().collect();
        names.sort();
        names.dedup();
        for n in &names {
            if !is_safe_rel_path(n) {
                return Err(Error::bad_checkpoint(
                    dir.join(INDEX_FILE),
                    format!("shard name '{n}' escapes the directory"),
                ));
            }
            if !dir.join(n).is_file() {
                return Err(Error::bad_checkpoint(
                    dir,
                    format!("missing shard {n} named by {INDEX_FILE}; download the complete checkpoint"),
                ));
            }
        }
        return Ok(names);
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))? {
        let entry = entry.map_err(|e| Error::io("listing", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && !name.starts_with('.') && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Lists the auxiliary files below `dir`, sorted by relative path.
fn list_aux(dir: &Path, shards: &[String]) -> Result<(Vec<AuxFile>, Vec<Skipped>)> {
    let mut aux = Vec::new();
    let mut skipped = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io("listing", &d, e))? {
            let entry = entry.map_err(|e| Error::io("listing", &d, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = format!("{prefix}{name}");
            let path = entry.path();
            if name.starts_with('.') {
                continue;
            }
            let meta = std::fs::metadata(&path).map_err(|e| Error::io("reading metadata of", &path, e))?;
            if meta.is_dir() {
                if !entry.file_type().map(|t| t.is_symlink()).unwrap_or(false) {
                    stack.push((path, format!("{rel}/")));
                }
                continue;
            }
            if !meta.is_file() {
                skipped.push(Skipped {
                    path: rel,
                    reason: "not a regular file".into(),
                });
                continue;
            }
            if shards.contains(&rel) {
                continue;
            }
            let ext = name
                .rsplit_once('.')
                .map(|(_, e)| e.to_ascii_lowercase())
                .unwrap_or_default();
            if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
                skipped.push(Skipped {
                    path: rel,
                    reason: "may contain pickled code; deltapack never reads pickles".into(),
                });
                continue;
            }
            aux.push(AuxFile {
                rel,
                path,
                size: meta.len(),
            });
        }
    }
    aux.sort_by(|a, b| a.rel.cmp(&b.rel));
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((aux, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_paths() {
        for ok in ["config.json", "1_Pooling/config.json", "a.b"] {
            assert!(is_safe_rel_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\..\\b",
            "C:x",
            "a/.",
        ] {
            assert!(!is_safe_rel_path(bad), "{bad}");
        }
    }
}
