//! The deltatensors `.wdelta` format, version 1 (the only one deltatensors 0.2.0 reads or
//! writes), parsed as hostile input, and its decoder.
//!
//! Layout, every integer little-endian:
//!
//! ```text
//! "wdelta\0" | u32 version | u32 H | H bytes of JSON header | records | SHA-256 of all before it
//! record:  u32 + tensor name | u32 + field name | u32 + numpy dtype name | u32 ndim
//!          | ndim x u64 shape | u64 byte length | the array's bytes
//! ```
//!
//! The header maps each tensor name to `strategy` (`sparse`, `quantized` or `int4`), `shape`,
//! `dtype` (the delta's dtype: always `float32`), the strategy's scalars, and one
//! `{"_ref": FIELD}` per array field. Records may come in any order (the streaming writer
//! groups them by base shard); each carries its tensor and field name.
//!
//! Every field is checked before use: lengths against the file, each record against the
//! header that references it, every array length against the tensor's element count, and,
//! while decoding, every index against the tensor. Anything deltatensors' writer never
//! produces is rejected rather than guessed at, so a file that passes decodes to exactly
//! the values deltatensors' loader returns.

use std::collections::HashMap;

use serde::Deserialize;

/// The first seven bytes of every `.wdelta` file.
pub const MAGIC: &[u8; 7] = b"wdelta\0";
/// The format version this module reads.
pub const VERSION: u32 = 1;
/// Magic, version and header length.
const PREAMBLE: usize = 15;
/// The SHA-256 digest at the end.
pub const TRAILER: usize = 32;

/// How a tensor's delta is coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The largest deltas by magnitude: int64 indices and float32 values.
    Sparse,
    /// One sign bit per value and one float16 scale per row (BitDelta).
    Quantized,
    /// Float16 outliers plus 4-bit min-max codes for the other values.
    Int4,
}

impl Strategy {
    /// The name deltatensors gives it.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Sparse => "sparse",
            Strategy::Quantized => "quantized",
            Strategy::Int4 => "int4",
        }
    }

    /// The array fields of the strategy, in deltatensors' `_ARRAY_FIELDS` order.
    fn fields(self) -> &'static [Field] {
        match self {
            Strategy::Sparse => &SPARSE_FIELDS,
            Strategy::Quantized => &QUANTIZED_FIELDS,
            Strategy::Int4 => &INT4_FIELDS,
        }
    }
}

/// Element type of an array record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    I64,
    F32,
    F16,
    U8,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::I64 => 8,
            Elem::F32 => 4,
            Elem::F16 => 2,
            Elem::U8 => 1,
        }
    }

    /// `str(array.dtype)` in numpy, as records spell it (little-endian, native).
    fn numpy_name(self) -> &'static str {
        match self {
            Elem::I64 => "int64",
            Elem::F32 => "float32",
            Elem::F16 => "float16",
            Elem::U8 => "uint8",
        }
    }
}

/// One array field of a strategy and the dtype deltatensors always writes it in.
struct Field {
    name: &'static str,
    elem: Elem,
}

const fn field(name: &'static str, elem: Elem) -> Field {
    Field { name, elem }
}

const SPARSE_FIELDS: [Field; 2] = [field("indices", Elem::I64), field("values", Elem::F32)];
const QUANTIZED_FIELDS: [Field; 2] = [field("scales", Elem::F16), field("packed_signs", Elem::U8)];
const INT4_FIELDS: [Field; 5] = [
    field("outlier_idx", Elem::I64),
    field("outlier_vals", Elem::F16),
    field("scale", Elem::F16),
    field("zero_point", Elem::F16),
    field("packed", Elem::U8),
];

/// Where one array's bytes lie in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Array {
    offset: usize,
    len: usize,
}

/// One tensor of a `.wdelta`, validated against its records.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Tensor name, as in the base checkpoint.
    pub name: String,
    /// Shape of the delta; the base tensor must have the same.
    pub shape: Vec<usize>,
    /// Number of elements.
    pub numel: usize,
    /// How the delta is coded.
    pub strategy: Strategy,
    /// `n_cols` for quantized (values per scale), `n_outliers` for int4, unused for sparse.
    param: usize,
    /// One array per field of the strategy, in [`Strategy::fields`] order.
    arrays: Vec<Array>,
}

/// A parsed `.wdelta`: its header and where each array lies. It borrows nothing; pass the
/// same bytes it was parsed from to [`decode`].
#[derive(Debug, Clone)]
pub struct Layout {
    /// Format version (always [`VERSION`]).
    pub version: u32,
    /// SHA-256 (64 lowercase hex digits) of the base as deltatensors hashed it.
    pub parent_hash: String,
    /// The strategy the header names for the whole file.
    pub strategy: Strategy,
    /// The tensors, in header order.
    pub tensors: Vec<Tensor>,
}

/// Checks the SHA-256 trailer of a whole file, feeding `on_chunk` the size of each piece
/// hashed (for progress). Call it before trusting anything [`parse`] returns.
pub fn verify_checksum(bytes: &[u8], on_chunk: &mut dyn FnMut(usize)) -> Result<(), String> {
    use sha2::Digest;
    let content_len = check_size(bytes)?;
    let mut h = sha2::Sha256::new();
    for piece in bytes[..content_len].chunks(8 << 20) {
        h.update(piece);
        on_chunk(piece.len());
    }
    if h.finalize().as_slice() != &bytes[content_len..] {
        return Err("SHA-256 checksum mismatch: the file is corrupted or truncated".into());
    }
    Ok(())
}

/// Checks the magic number and version; returns the length of the content before the trailer.
fn check_size(bytes: &[u8]) -> Result<usize, String> {
    if !bytes.starts_with(MAGIC) {
        return Err("not a deltatensors .wdelta file (it does not start with \"wdelta\\0\")".into());
    }
    if bytes.len() < PREAMBLE + TRAILER {
        return Err(format!(
            "truncated: {} bytes is shorter than the smallest .wdelta file",
            bytes.len()
        ));
    }
    let version = read_u32(bytes, 7);
    if version != VERSION {
        return Err(format!(
            "format version {version} is not supported; deltatensors 0.2.0 writes version {VERSION}"
        ));
    }
    Ok(bytes.len() - TRAILER)
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Parses and validates the header and the records. Does not check the SHA-256 trailer
/// (see [`verify_checksum`]) nor the arrays' contents (see [`decode`]).
pub fn parse(bytes: &[u8]) -> Result<Layout, String> {
    let content_len = check_size(bytes)?;
    let header_len = read_u32(bytes, 11) as usize;
    let header_end = PREAMBLE
        .checked_add(header_len)
        .filter(|&e| e <= content_len)
        .ok_or_else(|| format!("the {header_len}-byte header runs past the end of the file"))?;
    let raw: RawHeader =
        serde_json::from_slice(&bytes[PREAMBLE..header_end]).map_err(|e| format!("invalid JSON header: {e}"))?;
    let mut layout = raw.validate()?;
    read_records(bytes, header_end, content_len, &mut layout.tensors)?;
    for t in &layout.tensors {
        check_lengths(t).map_err(|e| format!("tensor '{}': {e}", t.name))?;
    }
    Ok(layout)
}

/// The header as JSON has it. Unknown fields anywhere are errors: deltatensors 0.2.0 writes
/// none, and a field we do not understand could change what the file means.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    parent_hash: String,
    strategy: String,
    tensors: RawTensors,
}

/// The `tensors` object, in file order; a name given twice is an error, not "last one wins".
struct RawTensors(Vec<(String, RawTensor)>);

impl<'de> Deserialize<'de> for RawTensors {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawTensors;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object mapping tensor names to their metadata")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RawTensors, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::new();
                while let Some((name, meta)) = map.next_entry::<String, RawTensor>()? {
                    if !seen.insert(name.clone()) {
                        return Err(serde::de::Error::custom(format!("tensor '{name}' is listed twice")));
                    }
                    out.push((name, meta));
                }
                Ok(RawTensors(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(tag = "strategy", rename_all = "lowercase")]
enum RawTensor {
    Sparse(RawSparse),
    Quantized(RawQuantized),
    Int4(RawInt4),
}

/// `{"_ref": FIELD}`: the placeholder for an array stored as a record.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ref {
    #[serde(rename = "_ref")]
    target: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSparse {
    shape: Vec<u64>,
    dtype: String,
    #[serde(rename = "sparsity")]
    _sparsity: f64,
    indices: Ref,
    values: Ref,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuantized {
    shape: Vec<u64>,
    dtype: String,
    n_elements: u64,
    n_cols: u64,
    scales: Ref,
    packed_signs: Ref,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInt4 {
    shape: Vec<u64>,
    dtype: String,
    #[serde(rename = "outlier_fraction")]
    _outlier_fraction: f64,
    n_elements: u64,
    n_outliers: u64,
    outlier_idx: Ref,
    outlier_vals: Ref,
    scale: Ref,
    zero_point: Ref,
    packed: Ref,
}

impl RawHeader {
    fn validate(self) -> Result<Layout, String> {
        let hex = |c: u8| c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
        if self.parent_hash.len() != 64 || !self.parent_hash.bytes().all(hex) {
            return Err(format!(
                "parent_hash '{}' is not a SHA-256 in hexadecimal",
                self.parent_hash
            ));
        }
        let strategy = match self.strategy.as_str() {
            "sparse" => Strategy::Sparse,
            "quantized" => Strategy::Quantized,
            "int4" => Strategy::Int4,
            other => return Err(format!("unknown strategy '{other}'")),
        };
        let tensors = self
            .tensors
            .0
            .into_iter()
            .map(|(name, raw)| raw.validate(&name).map_err(|e| format!("tensor '{name}': {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Layout {
            version: VERSION,
            parent_hash: self.parent_hash,
            strategy,
            tensors,
        })
    }
}

impl RawTensor {
    /// Checks the scalars and references; the arrays are filled in by [`read_records`].
    fn validate(self, name: &str) -> Result<Tensor, String> {
        let (strategy, shape, dtype, refs, n_elements, param) = match self {
            RawTensor::Sparse(s) => (Strategy::Sparse, s.shape, s.dtype, vec![s.indices, s.values], None, 0),
            RawTensor::Quantized(q) => (
                Strategy::Quantized,
                q.shape,
                q.dtype,
                vec![q.scales, q.packed_signs],
                Some(q.n_elements),
                q.n_cols,
            ),
            RawTensor::Int4(i) => (
                Strategy::Int4,
                i.shape,
                i.dtype,
                vec![i.outlier_idx, i.outlier_vals, i.scale, i.zero_point, i.packed],
                Some(i.n_elements),
                i.n_outliers,
            ),
        };
        if dtype != "float32" {
            return Err(format!(
                "delta dtype '{dtype}' is not float32, the only one deltatensors writes"
            ));
        }
        for (r, f) in refs.iter().zip(strategy.fields()) {
            if r.target != f.name {
                return Err(format!("field '{}' refers to array '{}'", f.name, r.target));
            }
        }
        let shape = shape
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<Vec<_>>>()
            .ok_or("shape does not fit in memory")?;
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or("shape does not fit in memory")?;
        if let Some(n) = n_elements {
            if n != numel as u64 {
                return Err(format!("n_elements {n} is not the {numel} elements of shape {shape:?}"));
            }
        }
        let param = usize::try_from(param).map_err(|_| "count does not fit in memory")?;
        match strategy {
            Strategy::Quantized if param == 0 || numel % param != 0 => {
                return Err(format!("n_cols {param} does not divide the {numel} elements into rows"));
            }
            Strategy::Int4 if param > numel => {
                return Err(format!("n_outliers {param} exceeds the {numel} elements"));
            }
            _ => {}
        }
        Ok(Tensor {
            name: name.to_string(),
            shape,
            numel,
            strategy,
            param,
            arrays: Vec::new(),
        })
    }
}

/// Reads bounded little-endian fields off the record section.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&e| e <= self.end)
            .ok_or_else(|| format!("a record at byte {} runs past the end of the file", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn str(&mut self) -> Result<&'a str, String> {
        let n = self.u32()?;
        let at = self.pos;
        std::str::from_utf8(self.take(n.into())?).map_err(|_| format!("a record name at byte {at} is not UTF-8"))
    }
}

/// Indexes every record into the tensor that references it; every record must be
/// referenced by the header, once, and every reference must have its record.
fn read_records(bytes: &[u8], start: usize, end: usize, tensors: &mut [Tensor]) -> Result<(), String> {
    let by_name: HashMap<String, usize> = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let mut slots: Vec<Vec<Option<Array>>> = tensors.iter().map(|t| vec![None; t.strategy.fields().len()]).collect();
    let mut c = Cursor { bytes, pos: start, end };
    while c.pos < end {
        let (name, field) = (c.str()?, c.str()?);
        let dtype = c.str()?;
        let ndim = c.u32()?;
        let what = format!("record '{field}' of tensor '{name}'");
        let &ti = by_name
            .get(name)
            .ok_or_else(|| format!("{what}: the header has no such tensor"))?;
        let fields = tensors[ti].strategy.fields();
        let fi = fields
            .iter()
            .position(|f| f.name == field)
            .ok_or_else(|| format!("{what}: not a field of strategy {}", tensors[ti].strategy.name()))?;
        let elem = fields[fi].elem;
        if dtype != elem.numpy_name() {
            return Err(format!("{what}: dtype '{dtype}', expected {}", elem.numpy_name()));
        }
        if ndim != 1 {
            return Err(format!("{what}: {ndim} dimensions, expected 1"));
        }
        let len = c.u64()?;
        let nbytes = c.u64()?;
        if len.checked_mul(elem.size() as u64) != Some(nbytes) {
            return Err(format!(
                "{what}: {nbytes} bytes do not hold {len} values of {}",
                elem.numpy_name()
            ));
        }
        let offset = c.pos;
        c.take(nbytes)?;
        let slot = &mut slots[ti][fi];
        if slot.is_some() {
            return Err(format!("{what}: stored twice"));
        }
        *slot = Some(Array {
            offset,
            len: len as usize,
        });
    }
    for (t, slots) in tensors.iter_mut().zip(slots) {
        for (f, slot) in t.strategy.fields().iter().zip(&slots) {
            let a = slot.ok_or_else(|| format!("tensor '{}': array '{}' is missing", t.name, f.name))?;
            t.arrays.push(a);
        }
    }
    Ok(())
}

/// Every array's length must be the one the tensor's shape and scalars imply.
fn check_lengths(t: &Tensor) -> Result<(), String> {
    let n = t.numel;
    let expect: Vec<usize> = match t.strategy {
        Strategy::Sparse => {
            let k = t.arrays[0].len;
            if k > n {
                return Err(format!("{k} sparse values for {n} elements"));
            }
            vec![k, k]
        }
        Strategy::Quantized => vec![n / t.param, n.div_ceil(8)],
        Strategy::Int4 => {
            let k = t.param;
            vec![k, k, 1, 1, (n - k).div_ceil(2)]
        }
    };
    for ((a, f), want) in t.arrays.iter().zip(t.strategy.fields()).zip(expect) {
        if a.len != want {
            return Err(format!("array '{}' has {} values, expected {want}", f.name, a.len));
        }
    }
    Ok(())
}

/// The elements of array `i` of `t`, each `size` bytes.
fn elements<'a>(bytes: &'a [u8], t: &Tensor, i: usize) -> Result<std::slice::ChunksExact<'a, u8>, String> {
    let a = t.arrays[i];
    let size = t.strategy.fields()[i].elem.size();
    a.len
        .checked_mul(size)
        .and_then(|n| bytes.get(a.offset..a.offset.checked_add(n)?))
        .map(|s| s.chunks_exact(size))
        .ok_or_else(|| "array lies outside the file (not the bytes it was parsed from)".to_string())
}

fn f16(e: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([e[0], e[1]])).to_f32()
}

/// Positions named by an int64 index array: each must lie in the tensor and appear once.
fn positions(bytes: &[u8], t: &Tensor, i: usize) -> Result<(Vec<usize>, Vec<bool>), String> {
    let mut taken = vec![false; t.numel];
    let mut out = Vec::with_capacity(t.arrays[i].len);
    for e in elements(bytes, t, i)? {
        let v = i64::from_le_bytes(e.try_into().expect("8 bytes"));
        let p = usize::try_from(v)
            .ok()
            .filter(|&p| p < t.numel)
            .ok_or_else(|| format!("index {v} is outside the tensor's {} elements", t.numel))?;
        if std::mem::replace(&mut taken[p], true) {
            return Err(format!("index {v} appears twice"));
        }
        out.push(p);
    }
    Ok((out, taken))
}

/// Decodes the float32 delta of `t` into `delta` (resized to `t.numel`), computing each value
/// with the float32 operations, in the order, of deltatensors 0.2.0's `decompress`.
///
/// `bytes` must be the file `t` was parsed from. It allocates `t.numel` floats, which the
/// header alone does not bound (a sparse delta may be tiny and its tensor huge): check the
/// shape against the base tensor first, as the importer does. Indices out of range or repeated are
/// errors: deltatensors' writer never produces them and numpy would wrap or overwrite them.
/// NaN values keep their NaN-ness but not necessarily numpy's exact NaN bits.
pub fn decode(bytes: &[u8], t: &Tensor, delta: &mut Vec<f32>) -> Result<(), String> {
    delta.clear();
    delta.resize(t.numel, 0.0);
    match t.strategy {
        Strategy::Sparse => decode_sparse(bytes, t, delta),
        Strategy::Quantized => decode_quantized(bytes, t, delta),
        Strategy::Int4 => decode_int4(bytes, t, delta),
    }
}

/// `flat = zeros(n); flat[indices] = values`.
fn decode_sparse(bytes: &[u8], t: &Tensor, delta: &mut [f32]) -> Result<(), String> {
    let (idx, _) = positions(bytes, t, 0)?;
    for (p, e) in idx.into_iter().zip(elements(bytes, t, 1)?) {
        delta[p] = f32::from_le_bytes(e.try_into().expect("4 bytes"));
    }
    Ok(())
}

/// `signs (bit 1 -> +1.0, 0 -> -1.0, MSB first) * scales[row]` in float32.
fn decode_quantized(bytes: &[u8], t: &Tensor, delta: &mut [f32]) -> Result<(), String> {
    let scales: Vec<f32> = elements(bytes, t, 0)?.map(f16).collect();
    let signs: Vec<u8> = elements(bytes, t, 1)?.map(|e| e[0]).collect();
    for (r, row) in delta.chunks_mut(t.param).enumerate() {
        let start = r * t.param;
        for (c, v) in row.iter_mut().enumerate() {
            let i = start + c;
            let sign = if (signs[i / 8] >> (7 - i % 8)) & 1 == 1 {
                1.0f32
            } else {
                -1.0
            };
            *v = sign * scales[r];
        }
    }
    Ok(())
}

/// Non-outliers in order take `q / 15 * (scale * 15) + zero_point`; outliers their float16.
///
/// numpy evaluates that with `q` a float32 array and `scale`, `zero_point` Python floats:
/// `scale * 15` is a float64 product, rounded to float32 when it meets the array, and the
/// division, multiplication and addition are float32, left to right.
fn decode_int4(bytes: &[u8], t: &Tensor, delta: &mut [f32]) -> Result<(), String> {
    let scale = elements(bytes, t, 2)?.map(f16).next().expect("one scale");
    let zero_point = elements(bytes, t, 3)?.map(f16).next().expect("one zero point");
    let step = (f64::from(scale) * 15.0) as f32;
    let lut: [f32; 16] = std::array::from_fn(|q| q as f32 / 15.0 * step + zero_point);
    let (idx, is_outlier) = positions(bytes, t, 0)?;
    let mut codes = elements(bytes, t, 4)?.flat_map(|e| [e[0] >> 4, e[0] & 0x0F]);
    for (v, _) in delta.iter_mut().zip(&is_outlier).filter(|(_, &o)| !o) {
        *v = lut[usize::from(codes.next().expect("packed holds every non-outlier"))];
    }
    for (p, e) in idx.into_iter().zip(elements(bytes, t, 1)?) {
        delta[p] = f16(e);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One array record.
    pub fn record(name: &str, field: &str, dtype: &str, len: u64, data: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        for s in [name, field, dtype] {
            r.extend_from_slice(&(s.len() as u32).to_le_bytes());
            r.extend_from_slice(s.as_bytes());
        }
        r.extend_from_slice(&1u32.to_le_bytes());
        r.extend_from_slice(&len.to_le_bytes());
        r.extend_from_slice(&(data.len() as u64).to_le_bytes());
        r.extend_from_slice(data);
        r
    }

    /// A whole file: preamble, header, records and a correct SHA-256.
    pub fn file(version: u32, header: &str, records: &[Vec<u8>]) -> Vec<u8> {
        use sha2::Digest;
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&version.to_le_bytes());
        f.extend_from_slice(&(header.len() as u32).to_le_bytes());
        f.extend_from_slice(header.as_bytes());
        for r in records {
            f.extend_from_slice(r);
        }
        let digest = sha2::Sha256::digest(&f);
        f.extend_from_slice(&digest);
        f
    }

    const HASH: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn sparse_header(extra: &str) -> String {
        format!(
            r#"{{"parent_hash":"{HASH}","strategy":"sparse","tensors":{{"w":{{"strategy":"sparse","shape":[2,3],"dtype":"float32","sparsity":0.5,"indices":{{"_ref":"indices"}},"values":{{"_ref":"values"}}{extra}}}}}}}"#
        )
    }

    fn i64s(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn sparse_file(indices: &[i64], values: &[f32]) -> Vec<u8> {
        file(
            1,
            &sparse_header(""),
            &[
                record("w", "indices", "int64", indices.len() as u64, &i64s(indices)),
                record("w", "values", "float32", values.len() as u64, &f32s(values)),
            ],
        )
    }

    fn decode_all(f: &[u8]) -> Result<Vec<Vec<f32>>, String> {
        verify_checksum(f, &mut |_| {})?;
        let l = parse(f)?;
        l.tensors
            .iter()
            .map(|t| {
                let mut d = Vec::new();
                decode(f, t, &mut d).map(|_| d)
            })
            .collect()
    }

    #[test]
    fn sparse_decodes_and_records_may_come_in_any_order() {
        let f = sparse_file(&[1, 4], &[0.5, -2.0]);
        assert_eq!(decode_all(&f).unwrap(), vec![vec![0.0, 0.5, 0.0, 0.0, -2.0, 0.0]]);
        let swapped = file(
            1,
            &sparse_header(""),
            &[
                record("w", "values", "float32", 2, &f32s(&[0.5, -2.0])),
                record("w", "indices", "int64", 2, &i64s(&[1, 4])),
            ],
        );
        assert_eq!(decode_all(&swapped).unwrap(), decode_all(&f).unwrap());
    }

    #[test]
    fn quantized_signs_are_msb_first_per_row() {
        let header = format!(
            r#"{{"parent_hash":"{HASH}","strategy":"quantized","tensors":{{"q":{{"strategy":"quantized","shape":[2,5],"dtype":"float32","scales":{{"_ref":"scales"}},"packed_signs":{{"_ref":"packed_signs"}},"n_elements":10,"n_cols":5}}}}}}"#
        );
        let scales: Vec<u8> = [0.5f32, 2.0]
            .iter()
            .flat_map(|&s| half::f16::from_f32(s).to_bits().to_le_bytes())
            .collect();
        let f = file(
            1,
            &header,
            &[
                record("q", "scales", "float16", 2, &scales),
                record("q", "packed_signs", "uint8", 2, &[0b1010_0110, 0b1100_0000]),
            ],
        );
        assert_eq!(
            decode_all(&f).unwrap(),
            vec![vec![0.5, -0.5, 0.5, -0.5, -0.5, 2.0, 2.0, -2.0, 2.0, 2.0]]
        );
    }

    #[test]
    fn int4_skips_outliers_when_unpacking() {
        let header = format!(
            r#"{{"parent_hash":"{HASH}","strategy":"int4","tensors":{{"t":{{"strategy":"int4","shape":[5],"dtype":"float32","outlier_fraction":0.2,"n_elements":5,"n_outliers":2,"outlier_idx":{{"_ref":"outlier_idx"}},"outlier_vals":{{"_ref":"outlier_vals"}},"scale":{{"_ref":"scale"}},"zero_point":{{"_ref":"zero_point"}},"packed":{{"_ref":"packed"}}}}}}}}"#
        );
        let h = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes().to_vec();
        let f = file(
            1,
            &header,
            &[
                record("t", "outlier_idx", "int64", 2, &i64s(&[3, 1])),
                record("t", "outlier_vals", "float16", 2, &[h(7.0), h(-8.0)].concat()),
                record("t", "scale", "float16", 1, &h(0.5)),
                record("t", "zero_point", "float16", 1, &h(-1.0)),
                record("t", "packed", "uint8", 2, &[0x0F, 0x20]),
            ],
        );
        // codes 0, 15, 2 at positions 0, 2, 4: q / 15 * 7.5 - 1.
        assert_eq!(decode_all(&f).unwrap(), vec![vec![-1.0, -8.0, 6.5, 7.0, 0.0]]);
    }

    /// The records of the sparse tensor "w", with the index record's dtype and tensor name given.
    fn recs(idx_dtype: &str, name: &str) -> Vec<Vec<u8>> {
        vec![
            record(name, "indices", idx_dtype, 2, &i64s(&[1, 4])),
            record("w", "values", "float32", 2, &f32s(&[0.5, -2.0])),
        ]
    }

    #[test]
    fn hostile_files_are_errors_that_say_why() {
        let good = sparse_file(&[1, 4], &[0.5, -2.0]);
        let with_header = |extra: &str| file(1, &sparse_header(extra), &recs("int64", "w"));
        let mut dup = recs("int64", "w");
        dup.push(dup[0].clone());
        let mut short = recs("int64", "w");
        let n = short[1].len() - 4;
        short[1].truncate(n);
        let mut bad_sum = good.clone();
        *bad_sum.last_mut().unwrap() ^= 1;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "not a deltatensors .wdelta"),
            (
                [b"wdeltx\0".as_slice(), &good[7..]].concat(),
                "not a deltatensors .wdelta",
            ),
            (good[..40].to_vec(), "truncated"),
            (good[..good.len() - 1].to_vec(), "checksum"),
            (bad_sum, "checksum"),
            (file(2, &sparse_header(""), &recs("int64", "w")), "version 2"),
            (
                file(
                    1,
                    &sparse_header("").replacen("sparse", "dense", 1),
                    &recs("int64", "w"),
                ),
                "unknown strategy",
            ),
            (
                file(1, &sparse_header("").replacen("00", "zz", 1), &recs("int64", "w")),
                "parent_hash",
            ),
            (with_header(r#","extra":1"#), "unknown field"),
            (with_header(r#","shape":[6]"#), "duplicate field"),
            (
                file(
                    1,
                    &sparse_header("").replace(r#""dtype":"float32""#, r#""dtype":"float16""#),
                    &recs("int64", "w"),
                ),
                "float32",
            ),
            (
                file(
                    1,
                    &sparse_header("").replace(r#"{"_ref":"values"}"#, r#"{"_ref":"indices"}"#),
                    &recs("int64", "w"),
                ),
                "refers to",
            ),
            (file(1, &sparse_header(""), &[]), "missing"),
            (file(1, "{", &[]), "invalid JSON"),
            (file(1, &sparse_header(""), &recs("int32", "w")), "dtype 'int32'"),
            (file(1, &sparse_header(""), &recs("int64", "v")), "no such tensor"),
            (file(1, &sparse_header(""), &dup), "stored twice"),
            (file(1, &sparse_header(""), &short), "past the end"),
            (sparse_file(&[1, 6], &[0.5, -2.0]), "outside"),
            (sparse_file(&[-1, 4], &[0.5, -2.0]), "outside"),
            (sparse_file(&[4, 4], &[0.5, -2.0]), "twice"),
            (sparse_file(&[1, 4], &[0.5]), "expected 2"),
            (sparse_file(&[0, 1, 2, 3, 4, 5, 0], &[0.0; 7]), "7 sparse values"),
        ];
        for (f, why) in cases {
            let e = decode_all(&f).unwrap_err();
            assert!(e.contains(why), "expected an error about {why:?}, got {e:?}");
        }
        assert!(decode_all(&good).is_ok());
    }

    #[test]
    fn a_header_length_past_the_end_is_an_error() {
        let good = sparse_file(&[1, 4], &[0.5, -2.0]);
        let lying = [&good[..11], &u32::MAX.to_le_bytes(), &good[15..]].concat();
        assert!(parse(&lying).unwrap_err().contains("runs past the end"));
    }

    #[test]
    fn header_scalars_must_agree_with_the_shape() {
        let q = |n: u64, cols: u64| {
            let header = format!(
                r#"{{"parent_hash":"{HASH}","strategy":"quantized","tensors":{{"q":{{"strategy":"quantized","shape":[2,5],"dtype":"float32","scales":{{"_ref":"scales"}},"packed_signs":{{"_ref":"packed_signs"}},"n_elements":{n},"n_cols":{cols}}}}}}}"#
            );
            parse(&file(1, &header, &[])).unwrap_err()
        };
        assert!(q(11, 5).contains("n_elements"), "{}", q(11, 5));
        assert!(q(10, 0).contains("n_cols"));
        assert!(q(10, 3).contains("n_cols"));
        let huge = sparse_header("").replace("[2,3]", "[18446744073709551615,2]");
        assert!(parse(&file(1, &huge, &[])).unwrap_err().contains("shape"));
    }
}
