//! Serving fine-tunes without rebuilding dense weights: a delta (or chain) loaded once into
//! the packed compute layouts of [`deltapack_codec::packed`], so that a server computes a
//! linear layer as the base's product, once for a whole batch, plus each fine-tune's
//! `X · Δᵀ` on its own rows ([`matmul`]).
//!
//! Loading rebuilds each changed tensor through the chain (every fingerprint checked, the
//! base's included, as `apply` checks them), takes `Δ = rebuilt - base` and packs it by the
//! codec its delta was made with:
//! - `sign` and `sign-axis` without kept zeros: binary planes with the stored scales (the
//!   codec's `±row[i]·col[j]` before rounding to the dtype);
//! - with kept zeros (`zeros=keep`): ternary planes. In f32 and f64 the stored scales are
//!   used; in 16-bit dtypes each change is a whole number of its base value's ULPs, which no
//!   per-row and per-column scale reproduces, so the scales are fitted again to the rebuilt
//!   `|Δ|` (least squares over the changed values): the value-domain form this module serves;
//! - `quant`: the rebuilt `Δ` quantized again to the codec's bits (8 for a `step`) with a
//!   bf16 step per row and group of the codec's group size (where it divides the row), the
//!   codec's share of largest changes as an exact sparse residual;
//! - `sparse` and `dare`: the changed values, exactly, as a sparse matrix;
//! - exact tensors, tensors of one dimension and tensors without a same-named base tensor of
//!   the same dtype and shape: their rebuilt bytes, held densely ([`Served::Dense`]).
//!
//! Each packed tensor records how far its served values are from the stored reconstruction
//! ([`Conversion`]): 0 up to float rounding for value-domain forms, the cost of the
//! conversion for the others.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use deltapack_codec::kernels::Kernel;
use deltapack_codec::lossy::TensorCodec;
/// A packed delta, as [`Served::Packed`] holds it and [`matmul`] takes it.
pub use deltapack_codec::packed::Packed;
use deltapack_codec::packed::{Form, GroupScales, Planes, PlanesKind, Sparse};
use rayon::prelude::*;
use safetensors::Dtype;

use crate::apply::{plan_of, ChainReader};
use crate::container::index::TensorEntry;
use crate::progress::Progress;
use crate::{Chain, Error, Result};

/// One tensor of a fine-tune as a server holds it.
#[derive(Debug)]
pub enum Served {
    /// `Δ` in a packed compute layout.
    Packed(Box<Packed>),
    /// The fine-tune's own bytes (in the tensor's dtype), for what is not served as a delta.
    Dense(Vec<u8>),
}

/// How far a packed tensor's served `Δ` is from the one the delta rebuilds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Conversion {
    /// `||Δ_served - Δ_rebuilt|| / ||Δ_rebuilt||` (0 when `Δ_rebuilt` is 0).
    pub error: f64,
    /// `||Δ_rebuilt||`, to combine tensors' errors.
    pub delta_norm: f64,
}

/// A fine-tune's changed tensor, served.
#[derive(Debug)]
pub struct ServedTensor {
    /// Its name in the checkpoint.
    pub name: String,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<u64>,
    /// The codec of the delta's tensor (`exact` when not lossy).
    pub codec: String,
    /// What is held.
    pub served: Served,
    /// For packed tensors: the conversion's error.
    pub conversion: Conversion,
}

impl ServedTensor {
    /// Bytes held for it.
    pub fn bytes(&self) -> usize {
        match &self.served {
            Served::Packed(p) => p.bytes(),
            Served::Dense(b) => b.len(),
        }
    }

    /// The form's name: `binary`, `ternary`, `quant<bits>`, `sparse` or `dense`.
    pub fn form(&self) -> String {
        match &self.served {
            Served::Dense(_) => "dense".into(),
            Served::Packed(p) => match &p.form {
                Form::Sparse(_) => "sparse".into(),
                Form::Planes(pl) => match pl.kind() {
                    PlanesKind::Binary => "binary".into(),
                    PlanesKind::Ternary => "ternary".into(),
                    PlanesKind::Quant { bits } => format!("quant{bits}"),
                },
            },
        }
    }
}

/// A fine-tune loaded for serving: its changed tensors, by name.
#[derive(Debug)]
pub struct Tenant {
    /// The changed tensors, in the delta's order.
    pub tensors: Vec<ServedTensor>,
    by_name: HashMap<String, usize>,
}

impl Tenant {
    /// Loads the fine-tune `chain` rebuilds: every tensor that differs from the base, packed
    /// or dense (see the module documentation). Fails, having changed nothing, on a base
    /// whose tensors do not match the fingerprints the deltas recorded.
    pub fn load(chain: &Chain, progress: &dyn Progress) -> Result<Tenant> {
        let reader = ChainReader::new(chain)?;
        let top = chain.deltas.last().expect("a chain has a delta");
        // The names each delta leaves as its parent has them; a tensor is served when some
        // delta changes it (or lacks it: a new tensor).
        let unchanged: Vec<HashSet<&str>> = chain
            .deltas
            .iter()
            .map(|d| {
                d.index
                    .tensors()
                    .filter(|t| t.unchanged())
                    .map(|t| t.name.as_str())
                    .collect()
            })
            .collect();
        let names: Vec<&TensorEntry> = reader
            .tensors()
            .filter(|t| !unchanged.iter().all(|u| u.contains(t.name.as_str())))
            .collect();
        let total: u64 = names.iter().map(|t| t.len()).sum();
        progress.begin("serve", total);
        let tensors = names
            .par_iter()
            .map(|t| {
                if progress.cancelled() {
                    return Err(Error::Interrupted);
                }
                let s = serve_tensor(chain, &reader, top, t)?;
                progress.advance(t.len());
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()?;
        progress.finish();
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Tenant { tensors, by_name })
    }

    /// The served tensor `name`, if the fine-tune changed it.
    pub fn tensor(&self, name: &str) -> Option<&ServedTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Frees the bytes of the tensors held densely (a front end that keeps its own copies
    /// calls it); their entries stay, empty.
    pub fn drop_dense(&mut self) {
        for t in &mut self.tensors {
            if let Served::Dense(b) = &mut t.served {
                *b = Vec::new();
            }
        }
    }

    /// Bytes held for all tensors.
    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(ServedTensor::bytes).sum()
    }
}

fn serve_tensor(
    chain: &Chain,
    reader: &ChainReader,
    top: &crate::container::Delta,
    t: &TensorEntry,
) -> Result<ServedTensor> {
    let rebuilt = reader.tensor(&t.name)?;
    let dtype = crate::dtype::parse(&t.dtype).ok_or_else(|| Error::CorruptDelta {
        path: top.path.clone(),
        tensor: Some(t.name.clone()),
        reason: format!("unknown dtype '{}'", t.dtype),
    })?;
    let plan = plan_of(top, t)?;
    let codec = plan.codec.as_ref().map_or("exact", TensorCodec::name).to_string();
    let dense = |rebuilt| ServedTensor {
        name: t.name.clone(),
        dtype,
        shape: t.shape.clone(),
        codec: codec.clone(),
        served: Served::Dense(rebuilt),
        conversion: Conversion::default(),
    };
    let base = chain
        .base
        .tensor(&t.name)
        .filter(|b| b.dtype == dtype && b.shape.iter().map(|&d| d as u64).eq(t.shape.iter().copied()));
    let (Some(codec_plan), Some(base), true) = (plan.codec.as_ref(), base, t.shape.len() >= 2) else {
        return Ok(dense(rebuilt));
    };
    let Some(delta) = difference(dtype, &rebuilt, chain.base.tensor_bytes(base)?) else {
        return Ok(dense(rebuilt));
    };
    let rows = t.shape[0] as usize;
    let cols = (t.shape[1..].iter().product::<u64>()) as usize;
    if delta.iter().any(|d| !d.is_finite()) {
        return Ok(dense(rebuilt));
    }
    let sixteen = dtype.bitsize() == 16;
    let (packed, conversion) =
        pack(codec_plan, plan.axis.as_ref(), sixteen, rows, cols, &delta).map_err(|e| Error::CorruptDelta {
            path: top.path.clone(),
            tensor: Some(t.name.clone()),
            reason: format!("cannot serve it packed: {e}"),
        })?;
    Ok(ServedTensor {
        name: t.name.clone(),
        dtype,
        shape: t.shape.clone(),
        codec,
        served: Served::Packed(Box::new(packed)),
        conversion,
    })
}

/// `rebuilt - base` elementwise in f32 (f64 rounded), for float dtypes; `None` for others.
fn difference(dtype: Dtype, rebuilt: &[u8], base: &[u8]) -> Option<Vec<f32>> {
    fn each<const W: usize>(r: &[u8], b: &[u8], f: impl Fn([u8; W]) -> f32 + Sync) -> Vec<f32> {
        let (r, b) = (r.as_chunks::<W>().0, b.as_chunks::<W>().0);
        r.par_iter().zip(b).map(|(&r, &b)| f(r) - f(b)).collect()
    }
    Some(match dtype {
        Dtype::BF16 => each::<2>(rebuilt, base, |e| half::bf16::from_le_bytes(e).to_f32()),
        Dtype::F16 => each::<2>(rebuilt, base, |e| half::f16::from_le_bytes(e).to_f32()),
        Dtype::F32 => each::<4>(rebuilt, base, f32::from_le_bytes),
        Dtype::F64 => each::<8>(rebuilt, base, |e| f64::from_le_bytes(e) as f32),
        _ => return None,
    })
}

/// `Δ` (`rows x cols`) packed for `codec` (see the module documentation), and how far the
/// packed values are from `Δ`.
fn pack(
    codec: &TensorCodec,
    axis: Option<&(Vec<f32>, Vec<f32>)>,
    sixteen: bool,
    rows: usize,
    cols: usize,
    delta: &[f32],
) -> std::result::Result<(Packed, Conversion), deltapack_codec::packed::PackError> {
    let sign = |v: f32, ternary: bool| -> i8 {
        match () {
            _ if v > 0.0 => 1,
            _ if v < 0.0 => -1,
            _ if ternary => 0,
            // A binary change rounded away: either sign is as far from it.
            _ => 1,
        }
    };
    let (form, conversion) = match *codec {
        TensorCodec::Sign { scale, zeros } => {
            let codes: Vec<i8> = delta.iter().map(|&v| sign(v, zeros)).collect();
            let s = if zeros && sixteen { mean_abs(delta) } else { scale };
            let kind = if zeros { PlanesKind::Ternary } else { PlanesKind::Binary };
            let conversion = sign_conversion(delta, &codes, cols, &vec![s; rows], None);
            let planes = Planes::new(rows, cols, kind, &codes, 0, GroupScales::F32(vec![s; rows]), None)?;
            (Form::Planes(planes), conversion)
        }
        TensorCodec::SignAxis { zeros, .. } => {
            let codes: Vec<i8> = delta.iter().map(|&v| sign(v, zeros)).collect();
            let (mut r, mut c) = axis.cloned().unwrap_or_else(|| (vec![1.0; rows], vec![1.0; cols]));
            if r.len() != rows || c.len() != cols {
                return Err(deltapack_codec::packed::PackError(
                    "sign-axis scales of another shape".into(),
                ));
            }
            if zeros && sixteen {
                fit_rank1(delta, cols, &mut r, &mut c);
            }
            let kind = if zeros { PlanesKind::Ternary } else { PlanesKind::Binary };
            let conversion = sign_conversion(delta, &codes, cols, &r, Some(&c));
            let planes = Planes::new(rows, cols, kind, &codes, 0, GroupScales::F32(r), Some(c))?;
            (Form::Planes(planes), conversion)
        }
        TensorCodec::Quant {
            bits, group, outliers, ..
        } => {
            let outliers = if bits.is_some() { outliers } else { 0.0 };
            return requantize(delta, rows, cols, bits.unwrap_or(8), group as usize, outliers);
        }
        TensorCodec::Sparse { .. } | TensorCodec::Dare { .. } => {
            let sparse = Sparse::new(rows, cols, &nonzero(delta, cols))?;
            (Form::Sparse(sparse), exact_conversion(delta))
        }
    };
    Ok((Packed { form, residual: None }, conversion))
}

/// The conversion of a form that holds `delta` exactly.
fn exact_conversion(delta: &[f32]) -> Conversion {
    let norm = delta.iter().map(|&d| d as f64 * d as f64).sum::<f64>();
    Conversion {
        error: 0.0,
        delta_norm: norm.sqrt(),
    }
}

/// The conversion of a sign form: `code * r[i] * c[j]` (in f32, as the kernels compute it)
/// against `delta`.
fn sign_conversion(delta: &[f32], codes: &[i8], cols: usize, r: &[f32], c: Option<&[f32]>) -> Conversion {
    let sums = delta
        .par_chunks(cols.max(1))
        .zip(codes.par_chunks(cols.max(1)))
        .zip(r.par_iter())
        .map(|((d, code), &ri)| {
            let mut e = (0f64, 0f64);
            for (j, (&d, &k)) in d.iter().zip(code).enumerate() {
                let x = (ri * k as f32 * c.map_or(1.0, |c| c[j]) - d) as f64;
                e = (e.0 + x * x, e.1 + d as f64 * d as f64);
            }
            e
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    conversion(sums)
}

/// A conversion from its sums of squared errors and squared changes.
fn conversion((err, norm): (f64, f64)) -> Conversion {
    Conversion {
        error: if norm > 0.0 { (err / norm).sqrt() } else { 0.0 },
        delta_norm: norm.sqrt(),
    }
}

fn nonzero(delta: &[f32], cols: usize) -> Vec<(u32, u32, f32)> {
    delta
        .iter()
        .enumerate()
        .filter(|(_, &v)| v != 0.0)
        .map(|(k, &v)| ((k / cols) as u32, (k % cols) as u32, v))
        .collect()
}

/// The mean `|Δ|` of the changed values: the least-squares magnitude of a ternary form.
fn mean_abs(delta: &[f32]) -> f32 {
    let (sum, n) = delta
        .iter()
        .filter(|v| **v != 0.0)
        .fold((0f64, 0u64), |(s, n), v| (s + v.abs() as f64, n + 1));
    if n == 0 {
        0.0
    } else {
        (sum / n as f64) as f32
    }
}

/// Fits `r[i] * c[j]` to `|Δ_ij|` over the changed values by alternating least squares,
/// starting from the given scales.
fn fit_rank1(delta: &[f32], cols: usize, r: &mut [f32], c: &mut [f32]) {
    for _ in 0..8 {
        r.par_iter_mut().enumerate().for_each(|(i, ri)| {
            let (mut num, mut den) = (0f64, 0f64);
            for (d, &cj) in delta[i * cols..(i + 1) * cols].iter().zip(c.iter()) {
                if *d != 0.0 {
                    num += cj as f64 * d.abs() as f64;
                    den += cj as f64 * cj as f64;
                }
            }
            *ri = if den > 0.0 { (num / den) as f32 } else { 0.0 };
        });
        let (mut num, mut den) = (vec![0f64; cols], vec![0f64; cols]);
        for (i, &ri) in r.iter().enumerate() {
            for (j, d) in delta[i * cols..(i + 1) * cols].iter().enumerate() {
                if *d != 0.0 {
                    num[j] += ri as f64 * d.abs() as f64;
                    den[j] += ri as f64 * ri as f64;
                }
            }
        }
        for (j, cj) in c.iter_mut().enumerate() {
            *cj = if den[j] > 0.0 { (num[j] / den[j]) as f32 } else { 0.0 };
        }
    }
}

/// `Δ` quantized to `bits` with a bf16 step per row and group of `group` columns (one group
/// per row where `group` does not divide the row into 64-column words), the largest
/// `outliers` share of changes kept exactly in a sparse residual.
fn requantize(
    delta: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    outliers: f32,
) -> std::result::Result<(Packed, Conversion), deltapack_codec::packed::PackError> {
    let bits = bits.clamp(2, 8);
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let padded = cols.div_ceil(64).max(1) * 64;
    let group = if group >= 64 && group.is_multiple_of(64) && padded.is_multiple_of(group) {
        group
    } else {
        0
    };
    let g = if group == 0 { padded } else { group };
    let groups = padded / g;
    let outlier = outlier_mask(
        delta,
        ((outliers.clamp(0.0, 1.0) as f64) * delta.len() as f64).round() as usize,
    );
    let is_outlier = |k: usize| outlier.as_ref().is_some_and(|m| m[k]);
    let mut scales = vec![0u16; rows * groups];
    let mut codes = vec![0i8; rows * cols];
    scales
        .par_chunks_mut(groups)
        .zip(codes.par_chunks_mut(cols.max(1)))
        .enumerate()
        .for_each(|(i, (s, code))| {
            let row = &delta[i * cols..(i + 1) * cols];
            for (k, sk) in s.iter_mut().enumerate() {
                let span = (k * g).min(cols)..((k + 1) * g).min(cols);
                let amax = span
                    .clone()
                    .filter(|&j| !is_outlier(i * cols + j))
                    .fold(0f32, |m, j| m.max(row[j].abs()));
                let mut step = half::bf16::from_f32(amax / qmax);
                // Round the step up, so that no code exceeds the range.
                if step.to_f32() * qmax < amax {
                    step = half::bf16::from_bits(step.to_bits() + 1);
                }
                *sk = step.to_bits();
                let st = step.to_f32();
                for j in span {
                    let v = row[j];
                    code[j] = if st == 0.0 || is_outlier(i * cols + j) {
                        0
                    } else {
                        (v / st).round().clamp(-qmax, qmax) as i8
                    };
                }
            }
        });
    let residual: Vec<(u32, u32, f32)> = delta
        .iter()
        .enumerate()
        .filter(|&(k, _)| is_outlier(k))
        .map(|(k, &v)| ((k / cols) as u32, (k % cols) as u32, v))
        .collect();
    let conversion = quant_conversion(delta, &codes, &scales, cols, g, outlier.as_deref());
    let planes = Planes::new(
        rows,
        cols,
        PlanesKind::Quant { bits },
        &codes,
        group,
        GroupScales::Bf16(scales),
        None,
    )?;
    let packed = Packed {
        form: Form::Planes(planes),
        residual: (!residual.is_empty())
            .then(|| Sparse::new(rows, cols, &residual))
            .transpose()?,
    };
    Ok((packed, conversion))
}

/// The conversion of a quant form: `code * step` (outliers exact) against `delta`.
fn quant_conversion(
    delta: &[f32],
    codes: &[i8],
    steps: &[u16],
    cols: usize,
    group: usize,
    outlier: Option<&[bool]>,
) -> Conversion {
    let groups = cols.div_ceil(64).max(1) * 64 / group;
    let sums = (0..delta.len() / cols.max(1))
        .into_par_iter()
        .map(|i| {
            let mut e = (0f64, 0f64);
            for j in 0..cols {
                let k = i * cols + j;
                let d = delta[k];
                let step = f32::from_bits((steps[i * groups + j / group] as u32) << 16);
                let served = if outlier.is_some_and(|m| m[k]) {
                    d
                } else {
                    codes[k] as f32 * step
                };
                let x = (served - d) as f64;
                e = (e.0 + x * x, e.1 + d as f64 * d as f64);
            }
            e
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    conversion(sums)
}

/// The `keep` largest changes (ties by position), as a mask; `None` when none are kept.
fn outlier_mask(delta: &[f32], keep: usize) -> Option<Vec<bool>> {
    if keep == 0 {
        return None;
    }
    let mut order: Vec<u32> = (0..delta.len() as u32).collect();
    let k = keep.min(delta.len()) - 1;
    order.select_nth_unstable_by(k, |&a, &b| {
        delta[b as usize]
            .abs()
            .total_cmp(&delta[a as usize].abs())
            .then(a.cmp(&b))
    });
    let mut mask = vec![false; delta.len()];
    for &i in &order[..=k] {
        mask[i as usize] = delta[i as usize] != 0.0;
    }
    Some(mask)
}

/// `out[b] += x[b] · Δ_tᵀ`, where `t = tenants[b]` is the fine-tune of activation row `b`
/// (`None`: the base, nothing added). `x` is `n x cols` and `out` `n x rows`, row-major; every
/// `Some` form has that shape. Each fine-tune's rows are gathered and computed together, all
/// fine-tunes and blocks of output rows in parallel; the result does not depend on the
/// number of threads.
pub fn matmul(forms: &[&Packed], tenants: &[Option<usize>], x: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
    matmul_on(forms, tenants, x, cols, out, true)
}

/// [`matmul`] on the calling thread alone: for a server that gives the products one thread,
/// where handing each product to a pool and back costs more than a small product.
pub fn matmul_serial(
    forms: &[&Packed],
    tenants: &[Option<usize>],
    x: &[f32],
    cols: usize,
    out: &mut [f32],
) -> Result<()> {
    matmul_on(forms, tenants, x, cols, out, false)
}

fn matmul_on(
    forms: &[&Packed],
    tenants: &[Option<usize>],
    x: &[f32],
    cols: usize,
    out: &mut [f32],
    parallel: bool,
) -> Result<()> {
    let n = tenants.len();
    let rows = out.len() / n.max(1);
    if x.len() != n * cols || out.len() != n * rows {
        return Err(Error::InvalidArgument(format!(
            "activations of {} values and outputs of {} for {n} rows of {cols} inputs",
            x.len(),
            out.len()
        )));
    }
    if let Some(f) = forms.iter().find(|f| f.rows() != rows || f.cols() != cols) {
        return Err(Error::InvalidArgument(format!(
            "a delta of {} x {} for a layer of {rows} x {cols}",
            f.rows(),
            f.cols()
        )));
    }
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (b, t) in tenants.iter().enumerate() {
        let Some(t) = *t else { continue };
        if t >= forms.len() {
            return Err(Error::InvalidArgument(format!(
                "fine-tune {t} of {} given",
                forms.len()
            )));
        }
        match groups.iter_mut().find(|g| g.0 == t) {
            Some(g) => g.1.push(b),
            None => groups.push((t, vec![b])),
        }
    }
    let prepared: Vec<(Vec<f32>, Option<deltapack_codec::packed::Activations>)> = groups
        .iter()
        .map(|(t, members)| {
            let xs: Vec<f32> = members
                .iter()
                .flat_map(|&b| x[b * cols..(b + 1) * cols].iter().copied())
                .collect();
            let a = forms[*t].prepare(&xs, members.len());
            (xs, a)
        })
        .collect();
    let block = block_rows(rows);
    let jobs: Vec<(usize, Range<usize>)> = (0..groups.len())
        .flat_map(|g| (0..rows).step_by(block).map(move |r0| (g, r0..(r0 + block).min(rows))))
        .collect();
    let job = |(g, range): &(usize, Range<usize>)| {
        let (t, members) = &groups[*g];
        let (xs, a) = &prepared[*g];
        let mut y = vec![0f32; members.len() * range.len()];
        forms[*t].matmul_add(Kernel::WIDEST, xs, a.as_ref(), members.len(), range.clone(), &mut y);
        y
    };
    let parts: Vec<Vec<f32>> = if !parallel {
        jobs.iter().map(job).collect()
    } else {
        jobs.par_iter().map(job).collect()
    };
    for ((g, range), y) in jobs.iter().zip(parts) {
        for (k, &b) in groups[*g].1.iter().enumerate() {
            let dst = &mut out[b * rows + range.start..b * rows + range.end];
            dst.iter_mut()
                .zip(&y[k * range.len()..(k + 1) * range.len()])
                .for_each(|(o, v)| *o += v);
        }
    }
    Ok(())
}

/// Output rows per parallel job: enough jobs for every thread to take a few, each a
/// multiple of eight rows (the kernels' tallest tile).
fn block_rows(rows: usize) -> usize {
    let jobs = 4 * rayon::current_num_threads().max(1);
    (rows.div_ceil(jobs).div_ceil(8) * 8).max(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|k| ((k * 7919 % 201) as f32 - 100.0) * 1e-4)
            .collect()
    }

    #[test]
    fn requantizing_keeps_the_error_within_a_step() {
        let (rows, cols) = (8, 256);
        let d = ramp(rows, cols);
        let (p, c) = requantize(&d, rows, cols, 4, 128, 0.01).unwrap();
        assert!(
            (measured(&p, &d) - c.error).abs() < 1e-6,
            "the reported error is the served one"
        );
        assert!(c.error < 0.1, "{c:?}");
        assert!(p.residual.as_ref().is_some_and(|r| r.len() >= 20));
        let (_, c8) = requantize(&d, rows, cols, 8, 128, 0.0).unwrap();
        assert!(c8.error < c.error);
    }

    /// The served values' relative distance from `d`, from the dense rows.
    fn measured(p: &Packed, d: &[f32]) -> f64 {
        let cols = p.cols();
        let mut row = vec![0f32; cols];
        let (mut err, mut norm) = (0f64, 0f64);
        for i in 0..p.rows() {
            p.row_into(i, &mut row);
            for (&s, &v) in row.iter().zip(&d[i * cols..(i + 1) * cols]) {
                err += ((s - v) as f64).powi(2);
                norm += (v as f64).powi(2);
            }
        }
        (err / norm).sqrt()
    }

    #[test]
    fn sign_forms_report_their_conversion() {
        let (rows, cols) = (6, 70);
        let d = ramp(rows, cols);
        for zeros in [false, true] {
            let codec = TensorCodec::SignAxis {
                rows: rows as u64,
                cols: cols as u64,
                calibrated: false,
                zeros,
            };
            let axis = (vec![1e-3; rows], vec![2e-2; cols]);
            let (p, c) = pack(&codec, Some(&axis), true, rows, cols, &d).unwrap();
            assert!((measured(&p, &d) - c.error).abs() < 1e-6);
            assert!(c.error < 1.0);
        }
    }

    #[test]
    fn rank1_fit_recovers_an_outer_product() {
        let (rows, cols) = (5, 9);
        let (r0, c0): (Vec<f32>, Vec<f32>) = (
            (1..=5).map(|i| i as f32).collect(),
            (1..=9).map(|j| j as f32 * 0.1).collect(),
        );
        let d: Vec<f32> = (0..rows * cols)
            .map(|k| {
                let v = r0[k / cols] * c0[k % cols];
                if k % 3 == 0 {
                    -v
                } else if k % 7 == 0 {
                    0.0
                } else {
                    v
                }
            })
            .collect();
        let (mut r, mut c) = (vec![1.0; rows], vec![1.0; cols]);
        fit_rank1(&d, cols, &mut r, &mut c);
        for (k, &v) in d.iter().enumerate() {
            let (i, j) = (k / cols, k % cols);
            if v != 0.0 {
                assert!((r[i] * c[j] - v.abs()).abs() < 1e-4 * v.abs().max(1.0));
            }
        }
    }

    #[test]
    fn matmul_adds_each_rows_tenant_and_nothing_for_the_base() {
        let (rows, cols) = (70, 130);
        let make = |seed: usize| {
            let d: Vec<f32> = ramp(rows, cols)
                .iter()
                .enumerate()
                .map(|(k, v)| if (k + seed).is_multiple_of(5) { *v } else { 0.0 })
                .collect();
            (
                Packed {
                    form: Form::Sparse(Sparse::new(rows, cols, &nonzero(&d, cols)).unwrap()),
                    residual: None,
                },
                d,
            )
        };
        let (a, da) = make(0);
        let (b, db) = make(2);
        let x: Vec<f32> = (0..4 * cols).map(|k| (k % 13) as f32 - 6.0).collect();
        let tenants = [Some(1), None, Some(0), Some(1)];
        let mut out = vec![0f32; 4 * rows];
        matmul(&[&a, &b], &tenants, &x, cols, &mut out).unwrap();
        for (row, t) in tenants.iter().enumerate() {
            for i in 0..rows {
                let want: f32 = match t {
                    None => 0.0,
                    Some(t) => {
                        let d = if *t == 0 { &da } else { &db };
                        (0..cols).map(|j| d[i * cols + j] * x[row * cols + j]).sum()
                    }
                };
                assert!((out[row * rows + i] - want).abs() < 1e-4, "row {row}, output {i}");
            }
        }
        assert!(matmul(&[&a], &[Some(1)], &x[..cols], cols, &mut vec![0f32; rows]).is_err());
    }
}
