//! Packed compute layouts of lossy deltas, and their products with activations: what a
//! server holds per fine-tune to compute `Y += X · Δᵀ` without rebuilding `Δ`, or `base + Δ`,
//! as dense weights.
//!
//! `Δ` is a matrix of `rows x cols` (a weight's first dimension by the product of the others,
//! as `torch.nn.Linear` holds it) in one of two forms:
//! - [`Planes`]: bit planes with weights. With `B_p` the planes (bits), `w_p` their weights,
//!   `w_0` a constant, `a_ig` a scale per row and group of columns and `c_j` a scale per
//!   column: `Δ_ij = a_ig · (Σ_p w_p B_p,ij + w_0) · c_j`. The sign forms: binary, one plane
//!   of "positive" bits, `w = [2], w_0 = -1` (values ±1); ternary, planes "positive" and
//!   "negative", `w = [1, -1], w_0 = 0`; quant with `b` bits, the `b` planes of the code
//!   in offset binary, `w_p = 2^p, w_0 = -2^(b-1)`, `a` the group's step.
//! - [`Sparse`]: rows of (column, value) pairs: sparse and DARE deltas, and the outliers of
//!   quant (a [`Packed`] is a main form plus an optional sparse residual).
//!
//! The product reads one bit per weight and plane. Per row and plane it adds the activations
//! under the mask of the plane's bits (AVX-512: one masked add per 16 weights; AVX2: a mask
//! built from a byte per 8), then weighs the planes, adds the constant times the activations'
//! sum and scales: no multiplication per weight. Column scales are applied to the activations
//! once per call ([`Activations`]), not per weight.
//!
//! Every kernel path computes the same sums in the same order per lane: the results agree up
//! to float summation order between the portable and vector paths, and are identical for any
//! number of threads (a row's value is computed by one call, whatever the row ranges).

use std::ops::Range;

use crate::kernels::{self, Kernel};

/// Elements per vector lane group the kernels read at once (one AVX-512 register of f32).
pub const LANES: usize = 16;

/// How a row's column groups are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupScales {
    /// One f32 per row and group (the sign forms: one group per row).
    F32(Vec<f32>),
    /// One bf16 per row and group (quant's steps, which the codec stores as bf16 too).
    Bf16(Vec<u16>),
}

impl GroupScales {
    fn len(&self) -> usize {
        match self {
            GroupScales::F32(v) => v.len(),
            GroupScales::Bf16(v) => v.len(),
        }
    }

    fn get(&self, i: usize) -> f32 {
        match self {
            GroupScales::F32(v) => v[i],
            GroupScales::Bf16(v) => f32::from_bits((v[i] as u32) << 16),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            GroupScales::F32(v) => 4 * v.len(),
            GroupScales::Bf16(v) => 2 * v.len(),
        }
    }
}

/// What a [`Planes`] form codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanesKind {
    /// `±1` (one plane: positive).
    Binary,
    /// `-1, 0, +1` (planes: positive, negative).
    Ternary,
    /// Integer codes of `bits` bits in `[-(2^(bits-1) - 1), 2^(bits-1) - 1]`.
    Quant {
        /// Bits per code, 2 to 8.
        bits: u8,
    },
}

impl PlanesKind {
    /// The planes' count, weights and constant.
    fn weights(self) -> (Vec<f32>, f32) {
        match self {
            PlanesKind::Binary => (vec![2.0], -1.0),
            PlanesKind::Ternary => (vec![1.0, -1.0], 0.0),
            PlanesKind::Quant { bits } => (
                (0..bits).map(|p| (1u32 << p) as f32).collect(),
                -((1u32 << (bits - 1)) as f32),
            ),
        }
    }

    /// Whether the product takes its activations rounded to bf16 (on every path: the kinds
    /// that AVX-512 BF16 dot products compute, sign forms and quant codes of up to 5 bits).
    pub(crate) fn bf16_activations(self) -> bool {
        match self {
            PlanesKind::Binary | PlanesKind::Ternary => true,
            PlanesKind::Quant { bits } => bits <= 5,
        }
    }

    /// What quant adds to a code to make it unsigned (offset binary); 0 for the others.
    fn offset(self) -> i32 {
        match self {
            PlanesKind::Quant { bits } => 1 << (bits - 1),
            _ => 0,
        }
    }

    /// Whether `code` is one this kind holds.
    fn holds(self, code: i8) -> bool {
        let (max, zero) = self.range();
        (-max..=max).contains(&code) & (zero | (code != 0))
    }

    /// The largest code magnitude, and whether 0 is a code.
    fn range(self) -> (i8, bool) {
        match self {
            PlanesKind::Binary => (1, false),
            PlanesKind::Ternary => (1, true),
            PlanesKind::Quant { bits } => (((1i32 << (bits - 1)) - 1) as i8, true),
        }
    }
}

/// A delta as weighted bit planes (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    rows: usize,
    cols: usize,
    kind: PlanesKind,
    /// u64 words per row and plane: `ceil(cols / 64)`, bit `k` of word `w` is column `64w + k`.
    words: usize,
    planes: usize,
    /// Row `i`'s planes are `bits[(i * planes + p) * words..][..words]`: a row's planes lie
    /// together, so a row tile reads one contiguous run.
    bits: Vec<u64>,
    weights: Vec<f32>,
    constant: f32,
    /// Words per group of columns sharing a scale; divides `words`.
    group_words: usize,
    scales: GroupScales,
    col_scales: Option<Vec<f32>>,
}

/// Why a packed form could not be built: the caller passed inconsistent parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackError(pub String);

impl std::fmt::Display for PackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PackError {}

impl Planes {
    /// Packs `codes` (`rows x cols`, row-major) of `kind`, with `scales` per row and group of
    /// `group` columns (`group` a multiple of 64 that divides the row's padded width, or 0
    /// for one group per row) and optional per-column scales.
    pub fn new(
        rows: usize,
        cols: usize,
        kind: PlanesKind,
        codes: &[i8],
        group: usize,
        scales: GroupScales,
        col_scales: Option<Vec<f32>>,
    ) -> Result<Planes, PackError> {
        let words = cols.div_ceil(64).max(1);
        let group_words = if group == 0 { words } else { group / 64 };
        if !group.is_multiple_of(64) || group_words == 0 || !words.is_multiple_of(group_words) {
            return Err(PackError(format!(
                "a group of {group} columns does not divide rows of {cols} columns into 64-column words"
            )));
        }
        if codes.len() != rows * cols {
            return Err(PackError(format!("{} codes for a {rows} x {cols} matrix", codes.len())));
        }
        if scales.len() != rows * (words / group_words) {
            return Err(PackError(format!(
                "{} scales for {rows} rows of {} groups",
                scales.len(),
                words / group_words
            )));
        }
        if col_scales.as_ref().is_some_and(|c| c.len() != cols) {
            return Err(PackError(format!("column scales for another width than {cols}")));
        }
        // A fold without an early exit, so that the check vectorises; the search only on failure.
        let (max, zero) = kind.range();
        if !codes
            .iter()
            .fold(true, |ok, &c| ok & (-max <= c) & (c <= max) & (zero | (c != 0)))
        {
            let c = codes.iter().find(|&&c| !kind.holds(c)).expect("a code failed");
            return Err(PackError(format!("code {c} is not one a {kind:?} form holds")));
        }
        let (weights, constant) = kind.weights();
        let planes = weights.len();
        let mut bits = vec![0u64; rows * planes * words];
        let offset = kind.offset() as u8;
        for (i, row) in codes.chunks_exact(cols.max(1)).enumerate().take(rows) {
            let out = &mut bits[i * planes * words..(i + 1) * planes * words];
            for (w, chunk) in row.chunks(64).enumerate() {
                for (p, word) in plane_words(kind, offset, chunk).iter().enumerate().take(planes) {
                    out[p * words + w] = *word;
                }
            }
        }
        Ok(Planes {
            rows,
            cols,
            kind,
            words,
            planes,
            bits,
            weights,
            constant,
            group_words,
            scales,
            col_scales,
        })
    }

    /// The matrix's rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The matrix's columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// What it codes.
    pub fn kind(&self) -> PlanesKind {
        self.kind
    }

    /// Bytes held: planes, scales, column scales.
    pub fn bytes(&self) -> usize {
        8 * self.bits.len() + self.scales.bytes() + 4 * self.col_scales.as_ref().map_or(0, Vec::len)
    }

    fn groups(&self) -> usize {
        self.words / self.group_words
    }

    /// The value of row `i`, column `j` of `Δ` (in f32, as the kernels compute it).
    fn value(&self, i: usize, j: usize) -> f32 {
        let row = &self.bits[i * self.planes * self.words..];
        let mut t = self.constant;
        for p in 0..self.planes {
            if row[p * self.words + j / 64] >> (j % 64) & 1 == 1 {
                t += self.weights[p];
            }
        }
        let a = self.scales.get(i * self.groups() + j / 64 / self.group_words);
        a * t * self.col_scales.as_ref().map_or(1.0, |c| c[j])
    }

    /// Row `i` of `Δ` as dense f32 into `out` (`cols` values): an embedding's rows for the
    /// tokens of a batch, or a dense fallback.
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate().take(self.cols) {
            *o = self.value(i, j);
        }
    }

    fn view<'a>(&'a self, scales: &'a [f32]) -> PlanesView<'a> {
        PlanesView {
            kind: self.kind,
            bits: &self.bits,
            words: self.words,
            planes: self.planes,
            weights: &self.weights,
            constant: self.constant,
            group_words: self.group_words,
            scales,
        }
    }
}

/// The plane words of up to 64 codes (code `k` in bit `k`), eight codes at a time as the
/// bytes of a `u64` (SWAR: no per-code branch or shift).
fn plane_words(kind: PlanesKind, offset: u8, chunk: &[i8]) -> [u64; 8] {
    const MSB: u64 = 0x8080_8080_8080_8080;
    // The top bit of each byte, gathered into the low byte: bit `k` is byte `k`'s.
    let gather = |x: u64| (x & MSB).wrapping_mul(0x0002_0408_1020_4081) >> 56;
    let ones = 0x0101_0101_0101_0101u64;
    let mut words = [0u64; 8];
    for (e, eight) in chunk.chunks(8).enumerate() {
        let mut b = [0u8; 8];
        for (d, &c) in b.iter_mut().zip(eight) {
            *d = c as u8;
        }
        let x = u64::from_le_bytes(b);
        let valid = if eight.len() == 8 {
            0xff
        } else {
            (1u64 << eight.len()) - 1
        };
        let put = |words: &mut [u64; 8], p: usize, flags: u64| words[p] |= (flags & valid) << (8 * e);
        match kind {
            // Codes are ±1: positive is a clear top bit.
            PlanesKind::Binary => put(&mut words, 0, !gather(x) & 0xff),
            // 1 is 0x01 (low bit set, top clear), -1 is 0xff (top set), 0 is 0x00.
            PlanesKind::Ternary => {
                put(&mut words, 0, gather((x << 7) & !x));
                put(&mut words, 1, gather(x));
            }
            PlanesKind::Quant { bits } => {
                // `code + offset` per byte (in 0..2^bits, so no byte carries into the next),
                // added without carries between bytes.
                let o = offset as u64 * ones;
                let sum = ((x & !MSB) + (o & !MSB)) ^ ((x ^ o) & MSB);
                for p in 0..bits as usize {
                    put(&mut words, p, gather(sum << (7 - p)));
                }
            }
        }
    }
    words
}

/// A [`Planes`] form as the kernels see it, for a block of rows: `scales` holds the block's
/// scales (rows x groups, f32) and `bits` starts at the block's first row.
pub(crate) struct PlanesView<'a> {
    pub kind: PlanesKind,
    pub bits: &'a [u64],
    pub words: usize,
    pub planes: usize,
    pub weights: &'a [f32],
    pub constant: f32,
    pub group_words: usize,
    pub scales: &'a [f32],
}

impl PlanesView<'_> {
    pub fn groups(&self) -> usize {
        self.words / self.group_words
    }

    /// Row `i`'s plane `p` (`i` relative to the view).
    #[inline(always)]
    pub fn plane(&self, i: usize, p: usize) -> &[u64] {
        let at = (i * self.planes + p) * self.words;
        &self.bits[at..at + self.words]
    }
}

/// A batch of activations prepared for one [`Planes`] form: column-scaled, padded with zeros
/// to whole 64-column words, and summed per group and lane (for the constant term).
#[derive(Debug, Clone)]
pub struct Activations {
    pub(crate) n: usize,
    /// Padded width: `64 * words`.
    pub(crate) width: usize,
    /// `n x width`.
    pub(crate) x: Vec<f32>,
    /// The same values as bf16 bits, for the kinds whose activations are rounded to bf16 on
    /// every path (see [`Activations::new`]); empty for the others.
    pub(crate) xb: Vec<u16>,
    /// `n x groups x LANES`: lane `l` of group `g` sums the group's columns `≡ l (mod 16)`.
    pub(crate) sums: Vec<f32>,
}

impl Activations {
    /// Prepares `x` (`n x cols`, row-major, f32) for `planes`.
    pub fn new(planes: &Planes, x: &[f32], n: usize) -> Activations {
        let width = 64 * planes.words;
        let groups = planes.groups();
        let gw = 64 * planes.group_words;
        let mut xs = vec![0f32; n * width];
        for (dst, src) in xs.chunks_exact_mut(width).zip(x.chunks_exact(planes.cols.max(1))) {
            match &planes.col_scales {
                Some(c) => dst
                    .iter_mut()
                    .zip(src.iter().zip(c))
                    .for_each(|(d, (&x, &c))| *d = x * c),
                None => dst[..src.len()].copy_from_slice(src),
            }
        }
        // The sign forms' and narrow quant's kernels may take their activations as bf16
        // (AVX-512 BF16 dot products, 32 weights an instruction): every path rounds them alike,
        // so that the paths differ only in the order of their sums. The rounding changes a
        // product by at most 2^-9 of the sum of its terms' magnitudes.
        let mut xb = Vec::new();
        if planes.kind.bf16_activations() {
            xb = xs.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            xs.iter_mut()
                .zip(&xb)
                .for_each(|(v, &b)| *v = f32::from_bits((b as u32) << 16));
        }
        let mut sums = vec![0f32; n * groups * LANES];
        if planes.constant != 0.0 {
            for (row, s) in xs.chunks_exact(width).zip(sums.chunks_exact_mut(groups * LANES)) {
                for (g, sg) in s.chunks_exact_mut(LANES).enumerate() {
                    for block in row[g * gw..(g + 1) * gw].chunks_exact(LANES) {
                        sg.iter_mut().zip(block).for_each(|(a, &b)| *a += b);
                    }
                }
            }
        }
        Activations {
            n,
            width,
            x: xs,
            xb,
            sums,
        }
    }

    /// Rows of activations.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// A delta as rows of (column, value) pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sparse {
    rows: usize,
    cols: usize,
    /// Row `i`'s entries are `starts[i]..starts[i + 1]`.
    starts: Vec<u32>,
    columns: Vec<u32>,
    values: Vec<f32>,
}

impl Sparse {
    /// Packs the non-zero entries of `(row, column, value)` triples, sorted by row then
    /// column (as a row-major scan yields them).
    pub fn new(rows: usize, cols: usize, entries: &[(u32, u32, f32)]) -> Result<Sparse, PackError> {
        if entries.len() >= u32::MAX as usize {
            return Err(PackError("more than 2^32 entries in one sparse matrix".into()));
        }
        let mut starts = vec![0u32; rows + 1];
        let mut last = None;
        for &(i, j, _) in entries {
            if i as usize >= rows || j as usize >= cols || last.is_some_and(|l| l >= (i, j)) {
                return Err(PackError(format!(
                    "entry ({i}, {j}) out of order or outside {rows} x {cols}"
                )));
            }
            last = Some((i, j));
            starts[i as usize + 1] += 1;
        }
        for i in 0..rows {
            starts[i + 1] += starts[i];
        }
        Ok(Sparse {
            rows,
            cols,
            starts,
            columns: entries.iter().map(|e| e.1).collect(),
            values: entries.iter().map(|e| e.2).collect(),
        })
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.starts.len() + self.columns.len() + self.values.len())
    }

    fn row(&self, i: usize) -> Range<usize> {
        self.starts[i] as usize..self.starts[i + 1] as usize
    }

    /// Adds row `i` into `out` (`cols` values).
    pub fn add_row_into(&self, i: usize, out: &mut [f32]) {
        for k in self.row(i) {
            out[self.columns[k] as usize] += self.values[k];
        }
    }

    /// `out[b][i - rows.start] += Σ_j Δ_ij x[b][j]` for `rows` (`x`: `n x cols`, `out`:
    /// `n x rows.len()`).
    pub fn matmul_add(&self, x: &[f32], n: usize, rows: Range<usize>, out: &mut [f32]) {
        let len = rows.len();
        for (r, i) in rows.enumerate() {
            let entries = self.row(i);
            for b in 0..n {
                let xb = &x[b * self.cols..(b + 1) * self.cols];
                let mut acc = 0f32;
                for k in entries.clone() {
                    acc += self.values[k] * xb[self.columns[k] as usize];
                }
                out[b * len + r] += acc;
            }
        }
    }
}

/// One tensor's delta in its packed compute layout.
#[derive(Debug, Clone, PartialEq)]
pub enum Form {
    /// Weighted bit planes.
    Planes(Planes),
    /// Rows of (column, value) pairs.
    Sparse(Sparse),
}

/// A packed delta: the main form, and entries it does not hold (quant's outliers, values
/// the codec kept exactly) as a sparse residual added to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// The main form.
    pub form: Form,
    /// Added to the main form.
    pub residual: Option<Sparse>,
}

impl Packed {
    /// Output rows.
    pub fn rows(&self) -> usize {
        match &self.form {
            Form::Planes(p) => p.rows,
            Form::Sparse(s) => s.rows,
        }
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        match &self.form {
            Form::Planes(p) => p.cols,
            Form::Sparse(s) => s.cols,
        }
    }

    /// Bytes held, the residual included.
    pub fn bytes(&self) -> usize {
        let main = match &self.form {
            Form::Planes(p) => p.bytes(),
            Form::Sparse(s) => s.bytes(),
        };
        main + self.residual.as_ref().map_or(0, Sparse::bytes)
    }

    /// Row `i` of `Δ` as dense f32 into `out` (`cols` values).
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        match &self.form {
            Form::Planes(p) => p.row_into(i, out),
            Form::Sparse(s) => {
                out.fill(0.0);
                s.add_row_into(i, out);
            }
        }
        if let Some(r) = &self.residual {
            r.add_row_into(i, out);
        }
    }

    /// Prepares `x` (`n x cols`) for [`Packed::matmul_add`]; `None` for sparse forms, which
    /// read `x` as it is.
    pub fn prepare(&self, x: &[f32], n: usize) -> Option<Activations> {
        match &self.form {
            Form::Planes(p) => Some(Activations::new(p, x, n)),
            Form::Sparse(_) => None,
        }
    }

    /// `out[b][i - rows.start] += Σ_j Δ_ij x[b][j]` for the rows `rows` of `Δ`, with the
    /// widest vector code `kernel` allows. `x` is `n x cols` and `prepared` what
    /// [`Packed::prepare`] made of it; `out` is `n x rows.len()`, row-major.
    pub fn matmul_add(
        &self,
        kernel: Kernel,
        x: &[f32],
        prepared: Option<&Activations>,
        n: usize,
        rows: Range<usize>,
        out: &mut [f32],
    ) {
        assert!(rows.end <= self.rows() && x.len() == n * self.cols() && out.len() == n * rows.len());
        match (&self.form, prepared) {
            (Form::Planes(p), Some(a)) => planes_matmul_add(p, kernel, a, rows.clone(), out),
            (Form::Sparse(s), _) => s.matmul_add(x, n, rows.clone(), out),
            (Form::Planes(_), None) => panic!("planes need prepared activations"),
        }
        if let Some(r) = &self.residual {
            r.matmul_add(x, n, rows, out);
        }
    }
}

/// The planes' product for `rows`, in blocks whose scales are converted to f32 once.
fn planes_matmul_add(p: &Planes, kernel: Kernel, a: &Activations, rows: Range<usize>, out: &mut [f32]) {
    assert_eq!(a.width, 64 * p.words, "activations prepared for another form");
    const BLOCK: usize = 64;
    let groups = p.groups();
    let len = rows.len();
    let mut scales = vec![0f32; BLOCK * groups];
    let mut block_out = vec![0f32; a.n * BLOCK];
    for r0 in rows.clone().step_by(BLOCK) {
        let r1 = (r0 + BLOCK).min(rows.end);
        let nr = r1 - r0;
        for (k, s) in scales[..nr * groups].iter_mut().enumerate() {
            *s = p.scales.get(r0 * groups + k);
        }
        let at = r0 * p.planes * p.words;
        let view = PlanesView {
            bits: &p.bits[at..at + nr * p.planes * p.words],
            ..p.view(&scales[..nr * groups])
        };
        let y = &mut block_out[..a.n * nr];
        y.fill(0.0);
        if !kernels::planes_matmul(kernel, &view, a, nr, y) {
            planes_portable(&view, a, nr, y);
        }
        for b in 0..a.n {
            let dst = &mut out[b * len + (r0 - rows.start)..][..nr];
            dst.iter_mut().zip(&y[b * nr..(b + 1) * nr]).for_each(|(o, &v)| *o += v);
        }
    }
}

/// The portable product of a view's `nr` rows: `y[b][i] = Σ_g a_ig (Σ_p w_p m_pg + w_0 s_g)`,
/// each sum kept in [`LANES`] lanes (lane `l` takes the columns `≡ l (mod 16)`), as the
/// vector paths keep them, and the lanes added last.
pub(crate) fn planes_portable(v: &PlanesView, a: &Activations, nr: usize, y: &mut [f32]) {
    let groups = v.groups();
    let gw = v.group_words;
    for i in 0..nr {
        for b in 0..a.n {
            let xb = &a.x[b * a.width..(b + 1) * a.width];
            let mut acc = [0f32; LANES];
            for g in 0..groups {
                let mut t = [0f32; LANES];
                for p in 0..v.planes {
                    let plane = v.plane(i, p);
                    let mut m = [0f32; LANES];
                    for w in g * gw..(g + 1) * gw {
                        let word = plane[w];
                        for (k, &x) in xb[64 * w..64 * w + 64].iter().enumerate() {
                            if (word >> k) & 1 == 1 {
                                m[k % LANES] += x;
                            }
                        }
                    }
                    t.iter_mut()
                        .zip(&m)
                        .for_each(|(t, &m)| *t = v.weights[p].mul_add(m, *t));
                }
                if v.constant != 0.0 {
                    let s = &a.sums[(b * groups + g) * LANES..][..LANES];
                    t.iter_mut().zip(s).for_each(|(t, &s)| *t = v.constant.mul_add(s, *t));
                }
                let s = v.scales[i * groups + g];
                acc.iter_mut().zip(&t).for_each(|(acc, &t)| *acc = s.mul_add(t, *acc));
            }
            y[b * nr + i] += lane_sum(&acc);
        }
    }
}

/// The sum of 16 lanes in the order the vector paths reduce them: halves added pairwise.
#[inline]
pub(crate) fn lane_sum(l: &[f32; LANES]) -> f32 {
    let mut v = *l;
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for k in 0..w {
            v[k] += v[k + w];
        }
    }
    v[0]
}

#[cfg(test)]
mod tests;
