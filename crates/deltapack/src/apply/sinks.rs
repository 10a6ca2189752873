//! Where `apply` and `verify` send rebuilt bytes: the files of the output directory, or a
//! byte-for-byte comparison with the fine-tune (measuring lossy tensors' error).

use std::collections::BTreeSet;
use std::io::{BufWriter, Read, Write};

use crate::checkpoint::{Checkpoint, OutputDir, TensorRef};
use crate::codec::plan::QualitySums;
use crate::container::index::{AuxEntry, TensorEntry, WeightFile};
use crate::container::Delta;
use crate::{dtype, Error, Result};

use super::{Ctx, MeasuredTensor, RebuildReport, Sink};

/// Writes rebuilt files into a staging directory.
pub(super) struct DirSink {
    dir: OutputDir,
    current: Option<(BufWriter<std::fs::File>, String, u64)>,
    sync: bool,
}

impl DirSink {
    /// A sink writing the rebuilt files into `dir`, fsynced with `sync`.
    pub(super) fn new(dir: OutputDir, sync: bool) -> Self {
        DirSink {
            dir,
            current: None,
            sync,
        }
    }

    /// Closes the last file and moves the directory into place.
    pub(super) fn commit(mut self) -> Result<()> {
        self.close_current()?;
        self.dir.commit()
    }

    fn close_current(&mut self) -> Result<()> {
        let Some((w, rel, expected)) = self.current.take() else {
            return Ok(());
        };
        let path = self.dir.target().join(&rel);
        let f = w
            .into_inner()
            .map_err(|e| Error::io("writing", &path, e.into_error()))?;
        let len = f.metadata().map_err(|e| Error::io("writing", &path, e))?.len();
        if len != expected {
            return Err(Error::io(
                "writing",
                &path,
                std::io::Error::other(format!("wrote {len} bytes, expected {expected}")),
            ));
        }
        if self.sync {
            f.sync_all().map_err(|e| Error::io("syncing", &path, e))?;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let (w, rel, _) = self.current.as_mut().expect("a file is open");
        w.write_all(bytes)
            .map_err(|e| Error::io("writing", self.dir.target().join(rel.as_str()), e))
    }
}

impl Sink for DirSink {
    fn begin_file(&mut self, f: &WeightFile, header: &[u8]) -> Result<()> {
        self.close_current()?;
        let file = self.dir.create_file(&f.path)?;
        self.current = Some((BufWriter::with_capacity(1 << 20, file), f.path.clone(), f.size));
        self.write(header)
    }

    fn data(&mut self, _i: usize, _t: &TensorEntry, _offset: usize, bytes: &[u8]) -> Result<()> {
        self.write(bytes)
    }

    fn begin_aux(&mut self, a: &AuxEntry) -> Result<()> {
        self.close_current()?;
        let file = self.dir.create_file(&a.path)?;
        self.current = Some((BufWriter::with_capacity(1 << 20, file), a.path.clone(), a.size));
        Ok(())
    }

    fn aux_data(&mut self, bytes: &[u8]) -> Result<()> {
        self.write(bytes)
    }

    fn end_aux(&mut self) -> Result<()> {
        self.close_current()
    }
}

/// Compares rebuilt bytes with a fine-tune's files, or only lets the fingerprints be checked.
pub(super) struct CompareSink<'a> {
    ft: Option<&'a Checkpoint>,
    /// The chain, to measure lossy tensors' changes against their prediction.
    ctx: &'a Ctx<'a>,
    /// Error sums of each lossy tensor, in order.
    sums: Vec<(TensorEntry, QualitySums)>,
    seen_files: BTreeSet<String>,
    current: Option<usize>,
    /// The fine-tune's auxiliary file being compared, and its path.
    aux: Option<(std::io::BufReader<std::fs::File>, String)>,
}

impl<'a> CompareSink<'a> {
    /// A sink that checks the rebuilt model of `ctx`, against `ft` where given.
    pub(super) fn new(ctx: &'a Ctx<'a>, ft: Option<&'a Checkpoint>) -> Self {
        CompareSink {
            ft,
            ctx,
            seen_files: BTreeSet::new(),
            current: None,
            aux: None,
            sums: Vec::new(),
        }
    }

    /// Once the model is rebuilt: checks the fine-tune has nothing the delta lacks, and adds
    /// each lossy tensor's measured error, and the model's, to `report`.
    pub(super) fn finish_report(self, report: &mut RebuildReport) -> Result<()> {
        let delta = self.ctx.levels[self.ctx.top()].delta;
        self.finish(delta)?;
        report.compared_with_finetuned = self.ft.is_some();
        let (mut err, mut norm) = (0.0f64, 0.0f64);
        for (t, q) in &self.sums {
            let rec = t.quality.map_or(0.0, |q| q.error);
            let m = q.quality(0, 1);
            err += q.err_sq;
            norm += q.delta_sq;
            report.measured.push(MeasuredTensor {
                name: t.name.clone(),
                codec: t.codec.as_ref().map_or("exact", |c| c.name()).into(),
                recorded_error: rec,
                error: m.error,
                max_abs_error: m.max_abs_error,
            });
        }
        // Exact tensors count towards the model's delta norm with zero error.
        norm += delta
            .index
            .tensors()
            .filter(|t| t.codec.is_none())
            .filter_map(|t| t.quality)
            .map(|q| q.delta_norm * q.delta_norm)
            .sum::<f64>();
        report.measured_error = if norm > 0.0 { (err / norm).sqrt() } else { 0.0 };
        Ok(())
    }
}

impl CompareSink<'_> {
    fn mismatch(ft: &Checkpoint, path: &str, tensor: Option<&str>, reason: &str) -> Error {
        Error::Mismatch {
            path: ft.root.join(path),
            tensor: tensor.map(str::to_string),
            reason: reason.to_string(),
        }
    }

    /// Every file of the fine-tune must have been rebuilt.
    fn finish(&self, delta: &Delta) -> Result<()> {
        let Some(ft) = self.ft else { return Ok(()) };
        let skipped: BTreeSet<&str> = delta.index.skipped.iter().map(|s| s.path.as_str()).collect();
        let theirs = ft
            .shards
            .iter()
            .map(|s| s.rel.as_str())
            .chain(ft.aux.iter().map(|a| a.rel.as_str()));
        for p in theirs {
            if !self.seen_files.contains(p) && !skipped.contains(p) {
                return Err(Self::mismatch(ft, p, None, "is in the fine-tune but not in the delta"));
            }
        }
        Ok(())
    }
}

impl CompareSink<'_> {
    /// Adds a lossy chunk's error against the fine-tune to its tensor's sums.
    fn measure(
        &mut self,
        ft: &Checkpoint,
        theirs: &TensorRef,
        (i, t): (usize, &TensorEntry),
        range: std::ops::Range<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        let shard = &ft.shards[theirs.shard].rel;
        let dt = dtype::parse(&t.dtype).expect("validated dtype");
        let Some(target) = ft.bytes(theirs).get(range.clone()) else {
            return Err(Self::mismatch(ft, shard, Some(&t.name), "tensor has another size"));
        };
        if theirs.dtype != dt {
            return Err(Self::mismatch(ft, shard, Some(&t.name), "tensor has another dtype"));
        }
        // Lossy tensors are direct: their prediction is the same bytes of their source.
        let pred = match self.ctx.source_window(self.ctx.top(), i, range.clone())? {
            Some(w) => w.get(range.clone()).to_vec(),
            None => return Err(Self::mismatch(ft, shard, Some(&t.name), "tensor has no source")),
        };
        let q = QualitySums::chunk(dt, &pred, target, bytes);
        if self.sums.last().is_none_or(|(x, _)| x.name != t.name) {
            self.sums.push((t.clone(), QualitySums::default()));
        }
        self.sums.last_mut().expect("just pushed").1.add(&q);
        ft.release(theirs, range);
        Ok(())
    }
}

impl Sink for CompareSink<'_> {
    fn begin_file(&mut self, f: &WeightFile, header: &[u8]) -> Result<()> {
        self.seen_files.insert(f.path.clone());
        let Some(ft) = self.ft else { return Ok(()) };
        let i = ft.shards.iter().position(|s| s.rel == f.path);
        let i = i.ok_or_else(|| Self::mismatch(ft, &f.path, None, "is in the delta but not in the fine-tune"))?;
        if ft.shards[i].header_bytes() != header {
            return Err(Self::mismatch(ft, &f.path, None, "header differs"));
        }
        self.current = Some(i);
        Ok(())
    }

    fn data(&mut self, i: usize, t: &TensorEntry, offset: usize, bytes: &[u8]) -> Result<()> {
        let Some(ft) = self.ft else { return Ok(()) };
        let shard = self.current.expect("file begun");
        let theirs = ft.tensor(&t.name).filter(|x| x.shard == shard);
        let theirs =
            theirs.ok_or_else(|| Self::mismatch(ft, &ft.shards[shard].rel, Some(&t.name), "tensor missing"))?;
        let ours = offset..offset + bytes.len();
        if t.codec.is_some() {
            return self.measure(ft, theirs, (i, t), ours, bytes);
        }
        if ft.bytes(theirs).get(ours.clone()) != Some(bytes) {
            return Err(Self::mismatch(
                ft,
                &ft.shards[shard].rel,
                Some(&t.name),
                "rebuilt bytes differ",
            ));
        }
        ft.release(theirs, ours);
        Ok(())
    }

    fn begin_aux(&mut self, a: &AuxEntry) -> Result<()> {
        self.seen_files.insert(a.path.clone());
        let Some(ft) = self.ft else { return Ok(()) };
        let theirs = ft.aux.iter().find(|x| x.rel == a.path);
        let theirs =
            theirs.ok_or_else(|| Self::mismatch(ft, &a.path, None, "is in the delta but not in the fine-tune"))?;
        let f = std::fs::File::open(&theirs.path).map_err(|e| Error::io("reading", &theirs.path, e))?;
        self.aux = Some((std::io::BufReader::new(f), a.path.clone()));
        Ok(())
    }

    fn aux_data(&mut self, bytes: &[u8]) -> Result<()> {
        let (Some(ft), Some((theirs, path))) = (self.ft, self.aux.as_mut()) else {
            return Ok(());
        };
        let mut buf = vec![0u8; bytes.len()];
        let same = theirs.read_exact(&mut buf).is_ok() && buf == bytes;
        if !same {
            return Err(Self::mismatch(ft, path, None, "rebuilt file differs"));
        }
        Ok(())
    }

    fn end_aux(&mut self) -> Result<()> {
        let (Some(ft), Some((mut theirs, path))) = (self.ft, self.aux.take()) else {
            return Ok(());
        };
        let mut rest = [0u8; 1];
        if theirs
            .read(&mut rest)
            .map_err(|e| Error::io("reading", ft.root.join(&path), e))?
            != 0
        {
            return Err(Self::mismatch(ft, &path, None, "the fine-tune's file is longer"));
        }
        Ok(())
    }
}

/// Keeps the rebuilt model in memory: each tensor in a buffer of its own (decoded straight
/// into by the engine), each other file whole (for loading into a framework without writing
/// a directory).
#[derive(Default)]
pub(super) struct MemorySink {
    pub(super) tensors: Vec<super::LoadedTensor>,
    pub(super) files: Vec<super::LoadedFile>,
    /// Each weight file's `__metadata__`, in file order.
    pub(super) metadata: Vec<serde_json::Map<String, serde_json::Value>>,
}

impl Sink for MemorySink {
    fn begin_file(&mut self, f: &WeightFile, header: &[u8]) -> Result<()> {
        self.metadata.push(super::header_metadata(header));
        for t in &f.tensors {
            self.tensors.push(super::LoadedTensor {
                name: t.name.clone(),
                // Reading the index rejected unknown dtypes; U8 is never reached.
                dtype: t.element_dtype().unwrap_or(crate::Dtype::U8),
                shape: t.shape.iter().map(|&d| d as usize).collect(),
                // Filled by `tensors`: the engine decodes into buffers of its own.
                bytes: Vec::new(),
            });
        }
        Ok(())
    }

    fn data(&mut self, i: usize, _: &TensorEntry, _: usize, bytes: &[u8]) -> Result<()> {
        self.tensors[i].bytes.extend_from_slice(bytes);
        Ok(())
    }

    fn begin_aux(&mut self, a: &AuxEntry) -> Result<()> {
        self.files.push(super::LoadedFile {
            path: a.path.clone(),
            bytes: Vec::with_capacity(a.size as usize),
        });
        Ok(())
    }

    fn aux_data(&mut self, bytes: &[u8]) -> Result<()> {
        self.files
            .last_mut()
            .expect("begin_aux came first")
            .bytes
            .extend_from_slice(bytes);
        Ok(())
    }

    fn end_aux(&mut self) -> Result<()> {
        Ok(())
    }

    fn keeps_tensors(&self) -> bool {
        true
    }

    fn tensors(&mut self, buffers: Vec<Vec<u8>>) -> Result<()> {
        for (t, b) in self.tensors.iter_mut().zip(buffers) {
            t.bytes = b;
        }
        Ok(())
    }
}
