//! Hot swap: a resident base switched between fine-tunes must hold, at every step, exactly
//! what `apply` writes (or the base, bit for bit), and must never be left half-switched.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{bf16_pair, noise, t, with_index, write_st, T};
use deltapack::checkpoint::Checkpoint;
use deltapack::container::index::ChunkCodec;
use deltapack::container::index::Relation;
use deltapack::container::Delta;
use deltapack::hotswap::Resident;
use deltapack::progress::NoProgress;
use deltapack::tune::{CodecPolicy, CodecSpec};
use deltapack::{apply, make, ApplyOptions, ErrorKind, MakeOptions};

/// name -> (dtype, shape, bytes)
type State = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn state(r: &Resident) -> State {
    r.tensors()
        .map(|t| {
            (
                t.name.to_string(),
                (t.dtype.to_string(), t.shape.to_vec(), t.bytes.to_vec()),
            )
        })
        .collect()
}

/// Writes `tensors` as the checkpoint `dir`, in name order.
fn write_state(dir: &Path, tensors: &State) {
    let ts: Vec<T> = tensors
        .iter()
        .map(|(n, (dt, shape, bytes))| t(n, Box::leak(dt.clone().into_boxed_str()), shape, bytes.clone()))
        .collect();
    write_st(&dir.join("model.safetensors"), &ts);
}

fn checkpoint_state(dir: &Path) -> State {
    let ck = Checkpoint::open(dir).unwrap();
    ck.tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                (t.dtype.to_string(), t.shape.clone(), ck.bytes(t).to_vec()),
            )
        })
        .collect()
}

fn f32s(seed: u64, n: usize) -> Vec<f32> {
    noise(seed, n * 2)
        .chunks(2)
        .map(|b| (i16::from_le_bytes([b[0], b[1]]) as f32) * 1e-6)
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Base and two fine-tunes, in single files of tensors several 4 KiB chunks long.
///
/// A: vocabulary grown (resized), an untied `lm_head` (tied), an F32 tensor saved as BF16
/// (converted), a new tensor, a removed one. B: vocabulary shrunk, other changes, and its
/// own new tensor (made lossy in the tests).
fn models(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (eb, ea) = bf16_pair(1, 256 * 32);
    let (_, eb2) = bf16_pair(2, 256 * 32);
    let (wb, wa) = bf16_pair(3, 64 * 96);
    let (_, wb2) = bf16_pair(4, 64 * 96);
    let (bb, _) = bf16_pair(5, 64);
    let (ob, ob2) = bf16_pair(6, 32);
    let (extra, _) = bf16_pair(7, 4 * 32);
    let (head, _) = bf16_pair(8, 260 * 32);
    let conv = f32s(9, 32 * 32);
    let ids: Vec<u8> = (0..16u64).flat_map(|i| i.to_le_bytes()).collect();
    // Few values change (one in ten): coded as the `changes` of a chunk.
    let (sb, _) = bf16_pair(12, 64 * 64);
    let mut sa = sb.clone();
    for e in sa.chunks_exact_mut(2).step_by(10) {
        e[0] ^= 1;
    }
    let base_t = vec![
        t("layers.0.s", "BF16", &[64, 64], sb.clone()),
        t("model.embed_tokens.weight", "BF16", &[256, 32], eb.clone()),
        t("layers.0.w", "BF16", &[64, 96], wb),
        t("layers.0.b", "BF16", &[64], bb.clone()),
        t("layers.0.conv", "F32", &[32, 32], f32_bytes(&conv)),
        t("layers.0.old", "BF16", &[32], ob),
        t("ids", "I64", &[16], ids.clone()),
    ];
    let mut grown = ea.clone();
    grown.extend_from_slice(&extra);
    let conv_bf16: Vec<u8> = conv
        .iter()
        .enumerate()
        .flat_map(|(i, &x)| half::bf16::from_f32(x * if i % 3 == 0 { 1.01 } else { 1.0 }).to_le_bytes())
        .collect();
    let a_t = vec![
        t("layers.0.s", "BF16", &[64, 64], sa),
        t("model.embed_tokens.weight", "BF16", &[260, 32], grown),
        t("layers.0.w", "BF16", &[64, 96], wa),
        t("layers.0.b", "BF16", &[64], bb.clone()),
        t("layers.0.conv", "BF16", &[32, 32], conv_bf16),
        t("ids", "I64", &[16], ids.clone()),
        t("lm_head.weight", "BF16", &[260, 32], head),
        t("adapter.a", "F32", &[16, 16], f32_bytes(&f32s(10, 256))),
    ];
    let b_t = vec![
        t("layers.0.s", "BF16", &[64, 64], sb),
        t(
            "model.embed_tokens.weight",
            "BF16",
            &[250, 32],
            eb2[..250 * 32 * 2].to_vec(),
        ),
        t("layers.0.w", "BF16", &[64, 96], wb2),
        t("layers.0.b", "BF16", &[64], bb),
        t("layers.0.conv", "F32", &[32, 32], f32_bytes(&conv)),
        t("layers.0.old", "BF16", &[32], ob2),
        t("adapter.b", "F16", &[8], noise(11, 16)),
    ];
    let write = |name: &str, tensors: &[T]| {
        let dir = root.join(name);
        write_st(&dir.join("model.safetensors"), tensors);
        std::fs::write(dir.join("config.json"), format!(r#"{{"name": "{name}"}}"#)).unwrap();
        dir
    };
    (write("base", &base_t), write("a", &a_t), write("b", &b_t))
}

fn make_delta(base: &Path, ft: &Path, out: &Path, chunk_bytes: usize, codec: &str) {
    let opts = MakeOptions {
        chunk_bytes,
        force: true,
        codecs: CodecPolicy {
            default: codec.parse::<CodecSpec>().unwrap(),
            ..Default::default()
        },
        ..Default::default()
    };
    make(base, ft, out, &opts, &NoProgress).unwrap();
}

/// What `apply` rebuilds from `delta`: the reference every switch is held to.
fn applied(base: &Path, delta: &Path) -> State {
    let out = delta.with_extension("out");
    let opts = ApplyOptions {
        force: true,
        ..Default::default()
    };
    apply(base, delta, &out, &opts, &NoProgress).unwrap();
    checkpoint_state(&out)
}

/// The base, fine-tune B and deltas of fine-tunes A and B under `dir`: A exact in 4 KiB
/// chunks, B lossy (4-bit quantised where it can be) in 8 KiB chunks, so both chunk sizes
/// differ from the one fingerprinted at load.
fn exact_and_lossy_deltas(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let (base, a, b) = models(dir);
    let (da, db) = (dir.join("a.dpk"), dir.join("b.dpk"));
    make_delta(&base, &a, &da, 1 << 12, "exact");
    make_delta(&base, &b, &db, 1 << 13, "quant:bits=4");
    (base, b, da, db)
}

#[test]
fn switches_match_apply_at_every_step_and_revert_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (base, b, da, db) = exact_and_lossy_deltas(dir.path());
    let d = Delta::open(&da).unwrap();
    let rel = |n: &str| d.index.tensors().find(|t| t.name == n).unwrap().relation;
    assert_eq!(rel("model.embed_tokens.weight"), Relation::Resized);
    assert_eq!(rel("lm_head.weight"), Relation::Tied);
    assert_eq!(rel("layers.0.conv"), Relation::Converted);
    assert_eq!(rel("adapter.a"), Relation::New);
    assert_eq!(d.index.removed[0].name, "layers.0.old");
    let sparse = d.index.tensors().find(|t| t.name == "layers.0.s").unwrap();
    assert!(sparse.chunks.iter().all(|c| c.codec == ChunkCodec::Changes));
    let lossy = Delta::open(&db).unwrap();
    assert!(lossy.index.tensors().any(|t| t.codec.is_some()), "B has lossy tensors");

    let (want_base, want_a, want_b) = (checkpoint_state(&base), applied(&base, &da), applied(&base, &db));
    assert_ne!(
        want_b,
        checkpoint_state(&b),
        "B is lossy: apply does not give the fine-tune back"
    );
    assert!(want_a != want_base && want_b != want_base && want_a != want_b);
    // Small deltas stay mapped while active by default; with 0, every chunk's pages are
    // dropped after use and read again to revert.
    for keep in [None, Some(0)] {
        let mut r = Resident::load(&base).unwrap();
        if let Some(bytes) = keep {
            r.set_keep_mapped(bytes);
        }
        assert_eq!(state(&r), want_base);
        let steps: [(Option<&Path>, &State); 5] = [
            (Some(&da), &want_a),
            (Some(&db), &want_b),
            (None, &want_base),
            (Some(&da), &want_a),
            (None, &want_base),
        ];
        for (i, (delta, want)) in steps.into_iter().enumerate() {
            let report = r.switch_to(delta).unwrap();
            assert_eq!(state(&r), *want, "step {i}: {delta:?}, keep {keep:?}");
            assert_eq!(r.active(), delta);
            assert_eq!(report.undo_bytes, r.undo_bytes());
            assert_eq!(r.undo_bytes() == 0, delta.is_none(), "step {i}");
        }
        assert!(r.tensor("layers.0.old").is_some() && r.tensor("adapter.a").is_none());
    }
}

#[test]
fn a_delta_of_another_base_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, a, b) = models(dir.path());
    let other = dir.path().join("other");
    let mut tensors = checkpoint_state(&base);
    tensors.get_mut("layers.0.w").unwrap().2[10] ^= 1;
    write_state(&other, &tensors);
    let (da, wrong_default, wrong_small) = (
        dir.path().join("a.dpk"),
        dir.path().join("w1.dpk"),
        dir.path().join("w2.dpk"),
    );
    make_delta(&base, &a, &da, 1 << 21, "exact");
    make_delta(&other, &b, &wrong_default, 1 << 21, "exact");
    make_delta(&other, &b, &wrong_small, 1 << 12, "exact");
    let mut r = Resident::load(&base).unwrap();
    for held in [None, Some(da.as_path())] {
        r.switch_to(held).unwrap();
        let before = state(&r);
        // A known chunk size is refused up front; another only after a revert, then the
        // fine-tune held is applied again.
        for wrong in [&wrong_default, &wrong_small] {
            let e = r.switch_to(Some(wrong)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::WrongBase, "{e}");
            assert!(e.to_string().contains("layers.0.w"), "{e}");
            assert_eq!(state(&r), before);
            assert_eq!(r.active(), held);
        }
    }
}

/// The fine-tune loaded in the base's place: a switch to its own delta asks whether the two
/// were swapped, and says which base the delta expects.
#[test]
fn a_fine_tune_loaded_as_the_base_is_asked_about() {
    let dir = tempfile::tempdir().unwrap();
    let (base, a, _) = models(dir.path());
    let da = dir.path().join("a.dpk");
    make_delta(&base, &a, &da, 1 << 21, "exact");
    let fingerprint = Delta::open(&da).unwrap().index.base.fingerprint.clone();
    let mut r = Resident::load(&a).unwrap();
    let e = r.switch_to(Some(&da)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongBase, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("were the base and the fine-tune swapped?"), "{msg}");
    assert!(msg.contains(&fingerprint[..16]), "{msg}");
    assert_eq!(r.active(), None);
}

#[test]
fn a_corrupt_chunk_mid_switch_leaves_the_model_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (base, a, b) = models(dir.path());
    let (da, db) = (dir.path().join("a.dpk"), dir.path().join("b.dpk"));
    make_delta(&base, &a, &da, 1 << 12, "exact");
    make_delta(&base, &b, &db, 1 << 12, "exact");
    // Corrupt the last coded chunk of a tensor rewritten in place, while B's other tensors
    // switch in parallel; then one of a new tensor, decoded before anything is rewritten.
    let d = Delta::open(&db).unwrap();
    let last_chunk = |name: &str| {
        let t = d.index.tensors().find(|t| t.name == name).unwrap();
        t.chunks.iter().rfind(|c| c.len > 0).unwrap().clone()
    };
    let targets = [last_chunk("layers.0.w"), last_chunk("adapter.b")];
    let mut r = Resident::load(&base).unwrap();
    for (i, c) in targets.iter().enumerate() {
        let corrupt = dir.path().join(format!("corrupt{i}.dpk"));
        let mut bytes = std::fs::read(&db).unwrap();
        bytes[c.offset as usize + c.len as usize / 2] ^= 0x10;
        std::fs::write(&corrupt, bytes).unwrap();
        for held in [None, Some(da.as_path())] {
            r.switch_to(held).unwrap();
            let before = state(&r);
            let e = r.switch_to(Some(&corrupt)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::CorruptDelta, "{e}");
            assert_eq!(state(&r), before, "held {held:?}");
            assert_eq!(r.active(), held);
        }
    }
    r.switch_to(Some(&db)).unwrap();
    assert_eq!(state(&r), applied(&base, &db));
}

#[test]
fn a_delta_rewritten_in_place_while_active_is_refused_at_revert() {
    let dir = tempfile::tempdir().unwrap();
    let (base, a, _) = models(dir.path());
    let da = dir.path().join("a.dpk");
    make_delta(&base, &a, &da, 1 << 12, "exact");
    let d = Delta::open(&da).unwrap();
    let c = d.index.tensors().find(|t| t.name == "layers.0.w").unwrap().chunks[0].clone();
    drop(d);
    let mut r = Resident::load(&base).unwrap();
    r.switch_to(Some(&da)).unwrap();
    let at_a = state(&r);
    // Reverting reads the payloads of exact chunks again from the file the model keeps open.
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&da).unwrap();
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(c.offset + c.len / 2)).unwrap();
    f.read_exact(&mut byte).unwrap();
    f.seek(SeekFrom::Start(c.offset + c.len / 2)).unwrap();
    f.write_all(&[byte[0] ^ 0x10]).unwrap();
    f.sync_all().unwrap();
    let e = r.switch_to(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CorruptDelta, "{e}");
    assert_eq!(state(&r), at_a, "nothing was reverted");
    assert_eq!(r.active(), Some(da.as_path()));
    // Held under a child, A is reached after the child reverted: the child is applied again.
    let child = child_of_a(dir.path(), &a, "c", false);
    let dc = dir.path().join("c.dpk");
    f.seek(SeekFrom::Start(c.offset + c.len / 2)).unwrap();
    f.write_all(&byte).unwrap();
    f.sync_all().unwrap();
    make_child(&base, &da, &child, &dc);
    r.switch_to_chain(&[&da, &dc]).unwrap();
    f.seek(SeekFrom::Start(c.offset + c.len / 2)).unwrap();
    f.write_all(&[byte[0] ^ 0x10]).unwrap();
    f.sync_all().unwrap();
    let e = r.switch_to(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CorruptDelta, "{e}");
    assert_eq!(state(&r), checkpoint_state(&child));
    assert_eq!(r.active_chain(), [da.as_path(), dc.as_path()]);
    // Put back, it reverts bit for bit.
    f.seek(SeekFrom::Start(c.offset + c.len / 2)).unwrap();
    f.write_all(&byte).unwrap();
    f.sync_all().unwrap();
    r.switch_to(None).unwrap();
    assert_eq!(state(&r), checkpoint_state(&base));
}

/// A child of fine-tune A: some base tensors changed, the vocabulary grown again, every other
/// tensor (tied, converted, new ones included) as A has it; with `added`, one tensor more.
fn child_of_a(root: &Path, a: &Path, name: &str, added: bool) -> PathBuf {
    let mut tensors = checkpoint_state(a);
    // layers.0.b is one A left as the base has it.
    let changed = [
        ("layers.0.w", 1),
        ("layers.0.s", 7),
        ("model.embed_tokens.weight", 5),
        ("layers.0.b", 2),
    ];
    for (n, every) in changed {
        for e in tensors.get_mut(n).unwrap().2.chunks_exact_mut(2).step_by(every) {
            e[0] ^= 3;
        }
    }
    if added {
        tensors.insert("adapter.c".into(), ("BF16".into(), vec![4], noise(13, 8)));
    }
    // Four rows more than A's grown vocabulary.
    let embed = tensors.get_mut("model.embed_tokens.weight").unwrap();
    embed.1[0] += 4;
    embed.2.extend_from_slice(&noise(14, 4 * 32 * 2));
    let dir = root.join(name);
    write_state(&dir, &tensors);
    dir
}

fn make_child(base: &Path, parent: &Path, ft: &Path, out: &Path) {
    deltapack::make_child(base, &[parent.to_path_buf()], ft, out, &chunks_4k(), None, &NoProgress).unwrap();
}

#[test]
fn a_chain_switches_link_by_link_and_reverts_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (base, a, b) = models(dir.path());
    let c = child_of_a(dir.path(), &a, "c", false);
    let (da, db, dc) = (
        dir.path().join("a.dpk"),
        dir.path().join("b.dpk"),
        dir.path().join("c.dpk"),
    );
    make_delta(&base, &a, &da, 1 << 12, "exact");
    make_delta(&base, &b, &db, 1 << 13, "exact");
    make_child(&base, &da, &c, &dc);
    let child = Delta::open(&dc).unwrap();
    let rel = |n: &str| child.index.tensors().find(|t| t.name == n).unwrap().relation;
    assert_eq!(rel("model.embed_tokens.weight"), Relation::Resized);
    assert!(child.index.tensors().any(|t| t.unchanged() && t.name == "adapter.a"));
    let (want_base, want_a, want_b, want_c) = (
        checkpoint_state(&base),
        applied(&base, &da),
        applied(&base, &db),
        checkpoint_state(&c),
    );
    let mut r = Resident::load(&base).unwrap();
    let chain_c = [da.as_path(), dc.as_path()];

    r.switch_to_chain(&chain_c).unwrap();
    assert_eq!(state(&r), want_c);
    assert_eq!(r.active_chain(), chain_c);
    // From A's chain to C's: one link more, nothing reverted; and back: one link reverted.
    r.switch_to(Some(&da)).unwrap();
    assert_eq!(state(&r), want_a);
    let forward = r.switch_to_chain(&chain_c).unwrap();
    assert_eq!(state(&r), want_c);
    assert_eq!(forward.reverted_chunks, 0);
    assert!(forward.chunks > 0 && forward.tensors == 4, "{forward:?}");
    let back = r.switch_to_chain(&[&da]).unwrap();
    assert_eq!(state(&r), want_a);
    assert!(back.reverted_chunks > 0 && back.chunks == 0, "{back:?}");
    // From C's chain to another fine-tune, and to the base.
    r.switch_to_chain(&chain_c).unwrap();
    r.switch_to(Some(&db)).unwrap();
    assert_eq!(state(&r), want_b);
    r.switch_to_chain(&chain_c).unwrap();
    r.switch_to(None).unwrap();
    assert_eq!(state(&r), want_base);
    assert_eq!(r.undo_bytes(), 0);
    assert!(r.active_chain().is_empty());
}

#[test]
fn a_broken_or_unsupported_chain_leaves_the_model_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (base, a, b) = models(dir.path());
    let c = child_of_a(dir.path(), &a, "c", false);
    let added = child_of_a(dir.path(), &a, "d", true);
    let (da, db, dc, dd) = (
        dir.path().join("a.dpk"),
        dir.path().join("b.dpk"),
        dir.path().join("c.dpk"),
        dir.path().join("d.dpk"),
    );
    make_delta(&base, &a, &da, 1 << 12, "exact");
    make_delta(&base, &b, &db, 1 << 12, "exact");
    make_child(&base, &da, &c, &dc);
    make_child(&base, &da, &added, &dd);
    let mut r = Resident::load(&base).unwrap();
    for held in [
        vec![],
        vec![db.as_path()],
        vec![da.as_path()],
        vec![da.as_path(), dc.as_path()],
    ] {
        r.switch_to_chain(&held).unwrap();
        let before = state(&r);
        // A child without its parent, a child after another delta, a link adding a tensor.
        let broken: [&[&Path]; 3] = [&[&dc], &[&db, &dc], &[&da, &dd]];
        for (chain, kind) in broken
            .into_iter()
            .zip([ErrorKind::WrongBase, ErrorKind::WrongBase, ErrorKind::BadInput])
        {
            let e = r.switch_to_chain(chain).unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            assert_eq!(state(&r), before, "{chain:?} from {held:?}");
            assert_eq!(r.active_chain(), held);
        }
    }
}

/// The chunks of every tensor of a delta's index.
fn each_chunk(v: &mut serde_json::Value, mut f: impl FnMut(&str, &mut serde_json::Value)) {
    for file in v["files"].as_array_mut().unwrap() {
        for t in file["tensors"].as_array_mut().unwrap() {
            let name = t["name"].as_str().unwrap().to_string();
            t["chunks"].as_array_mut().unwrap().iter_mut().for_each(|c| f(&name, c));
        }
    }
}

/// `delta` as a writer before format 1.3 made it: no chunk records the xxh3 hash of its
/// rebuilt bytes, so a switch checks every tensor against its BLAKE3 fingerprint instead.
fn without_rebuilt_hashes(delta: &Path, out: &Path) -> PathBuf {
    with_index(delta, out, |v| {
        each_chunk(v, |_, c| {
            c.as_object_mut().unwrap().remove("q");
        })
    });
    out.to_path_buf()
}

#[test]
fn deltas_without_rebuilt_hashes_switch_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let (base, a, b) = models(dir.path());
    let c = child_of_a(dir.path(), &a, "c", false);
    let at = |n: &str| dir.path().join(n);
    make_delta(&base, &a, &at("a.dpk"), 1 << 12, "exact");
    make_delta(&base, &b, &at("b.dpk"), 1 << 13, "quant:bits=4");
    make_child(&base, &at("a.dpk"), &c, &at("c.dpk"));
    let (da, dc) = (at("a.dpk"), at("c.dpk"));
    let (la, lb, lc) = (
        without_rebuilt_hashes(&da, &at("la.dpk")),
        without_rebuilt_hashes(&at("b.dpk"), &at("lb.dpk")),
        without_rebuilt_hashes(&dc, &at("lc.dpk")),
    );
    let coded = |d: &Path| {
        let d = Delta::open(d).unwrap();
        let chunks: Vec<_> = d.index.tensors().flat_map(|t| t.chunks.clone()).collect();
        chunks
            .into_iter()
            .filter(|c| c.codec != ChunkCodec::Same)
            .collect::<Vec<_>>()
    };
    assert!(coded(&da).iter().all(|c| c.rebuilt_hash().is_some()));
    assert!(coded(&la).iter().all(|c| c.rebuilt.is_none()));
    let (want_base, want_a, want_b, want_c) = (
        checkpoint_state(&base),
        applied(&base, &da),
        applied(&base, &at("b.dpk")),
        checkpoint_state(&c),
    );
    let mut r = Resident::load(&base).unwrap();
    // Old links under new ones and new under old (A and its copy rebuild the same model, so
    // a switch keeps whichever of them it holds: each chain starts from the base).
    let steps: [(&[&Path], &State); 9] = [
        (&[&la], &want_a),
        (&[&lb], &want_b),
        (&[&la, &lc], &want_c),
        (&[&la], &want_a),
        (&[], &want_base),
        (&[&da, &lc], &want_c),
        (&[], &want_base),
        (&[&la, &dc], &want_c),
        (&[], &want_base),
    ];
    for (i, (chain, want)) in steps.into_iter().enumerate() {
        r.switch_to_chain(chain).unwrap();
        assert_eq!(state(&r), *want, "step {i}: {chain:?}");
        assert_eq!(r.active_chain(), chain, "step {i}");
    }
    // Such a tensor is checked against its fingerprint.
    let bad = at("bad.dpk");
    with_index(&la, &bad, |v| {
        let t = &mut v["files"][0]["tensors"].as_array_mut().unwrap();
        let w = t.iter_mut().find(|t| t["name"] == "layers.0.w").unwrap();
        w["hash"] = "0".repeat(64).into();
    });
    let e = r.switch_to(Some(&bad)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CorruptDelta, "{e}");
    assert!(e.to_string().contains("layers.0.w"), "{e}");
    assert_eq!(state(&r), want_base);
}

/// `links` as this build writes them, or without their rebuilt hashes (see
/// [`without_rebuilt_hashes`]).
fn written(links: &[&PathBuf], legacy: bool) -> Vec<PathBuf> {
    let copy = |p: &PathBuf| without_rebuilt_hashes(p, &p.with_extension("legacy.dpk"));
    links
        .iter()
        .map(|&p| if legacy { copy(p) } else { p.clone() })
        .collect()
}

/// `delta` with the recorded hash of the last chunk of `tensor` off by one bit.
fn with_wrong_rebuilt_hash(delta: &Path, out: &Path, tensor: &str) {
    with_index(delta, out, |v| {
        let mut coded = 0;
        each_chunk(v, |name, c| {
            coded += usize::from(name == tensor && c.get("q").is_some())
        });
        assert!(coded > 0, "{tensor} has chunks");
        each_chunk(v, |name, c| {
            if name == tensor && c.get("q").is_some() {
                coded -= 1;
                if coded == 0 {
                    let q = u64::from_str_radix(c["q"].as_str().unwrap(), 16).unwrap();
                    c["q"] = format!("{:016x}", q ^ 1).into();
                }
            }
        });
    });
}

#[test]
fn a_chunk_that_rebuilds_to_another_hash_is_refused_and_undone() {
    let dir = tempfile::tempdir().unwrap();
    let (base, a, _) = models(dir.path());
    let c = child_of_a(dir.path(), &a, "c", false);
    let (da, dc) = (dir.path().join("a.dpk"), dir.path().join("c.dpk"));
    make_delta(&base, &a, &da, 1 << 12, "exact");
    make_child(&base, &da, &c, &dc);
    let mut r = Resident::load(&base).unwrap();
    // Tensors rewritten in place (by the exact codec, by `changes`, grown), left as the base
    // has them (`same`), converted, new, predicted from another (tied).
    let first = [
        "layers.0.w",
        "layers.0.s",
        "model.embed_tokens.weight",
        "layers.0.b",
        "layers.0.conv",
        "adapter.a",
        "lm_head.weight",
    ];
    for (i, tensor) in first.into_iter().enumerate() {
        let bad = dir.path().join(format!("bad{i}.dpk"));
        with_wrong_rebuilt_hash(&da, &bad, tensor);
        let e = r.switch_to(Some(&bad)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CorruptDelta, "{tensor}: {e}");
        assert!(e.to_string().contains(tensor), "{e}");
        assert_eq!(state(&r), checkpoint_state(&base), "{tensor}");
        assert!(r.active_chain().is_empty());
    }
    r.switch_to(Some(&da)).unwrap();
    let at_a = state(&r);
    for (i, tensor) in ["layers.0.w", "model.embed_tokens.weight"].into_iter().enumerate() {
        let bad = dir.path().join(format!("bad-child{i}.dpk"));
        with_wrong_rebuilt_hash(&dc, &bad, tensor);
        let e = r.switch_to_chain(&[&da, &bad]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CorruptDelta, "{tensor}: {e}");
        assert_eq!(state(&r), at_a, "{tensor}");
        assert_eq!(r.active_chain(), [da.as_path()]);
    }
    r.switch_to_chain(&[&da, &dc]).unwrap();
    assert_eq!(state(&r), checkpoint_state(&c));
}

fn chunks_4k() -> MakeOptions {
    MakeOptions {
        chunk_bytes: 1 << 12,
        force: true,
        ..Default::default()
    }
}

/// Base: `w` BF16 [256, 32] (16 KiB, four 4 KiB chunks) and `v`.
/// A: `w` shrunk to `a_rows` rows (values moved). C (A's child): `w` with `c_rows` rows,
/// A's rows with the last one changed, rows beyond A's filled by `fill`.
fn shrinking_chain(
    root: &Path,
    a_rows: usize,
    c_rows: usize,
    fill: impl Fn(usize) -> u8,
) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let (wb, wa) = bf16_pair(1, 256 * 32);
    let (vb, va) = bf16_pair(2, 64 * 32);
    let base = root.join("base");
    write_st(
        &base.join("model.safetensors"),
        &[t("w", "BF16", &[256, 32], wb), t("v", "BF16", &[64, 32], vb)],
    );
    let a = root.join("a");
    let wa = wa[..a_rows * 64].to_vec();
    write_st(
        &a.join("model.safetensors"),
        &[
            t("w", "BF16", &[a_rows, 32], wa.clone()),
            t("v", "BF16", &[64, 32], va.clone()),
        ],
    );
    let mut wc = wa;
    // The last row of A's: in the last (partial, unless a_rows * 64 is a chunk multiple) chunk.
    let n = wc.len().min(c_rows * 64);
    for e in wc[n - 64..n].chunks_exact_mut(2) {
        e[0] ^= 1;
    }
    wc.resize(c_rows * 64, 0);
    for (i, b) in wc[n..].iter_mut().enumerate() {
        *b = fill(i);
    }
    let c = root.join("c");
    write_st(
        &c.join("model.safetensors"),
        &[t("w", "BF16", &[c_rows, 32], wc), t("v", "BF16", &[64, 32], va)],
    );
    let (da, dc) = (root.join("a.dpk"), root.join("c.dpk"));
    make(&base, &a, &da, &chunks_4k(), &NoProgress).unwrap();
    make_child(&base, &da, &c, &dc);
    // A valid chain: `apply` rebuilds C from it.
    let out = root.join("c-applied");
    let ao = deltapack::ApplyOptions {
        force: true,
        ..Default::default()
    };
    deltapack::apply_chain(&base, &[da.clone(), dc.clone()], &out, &ao, &NoProgress).unwrap();
    assert_eq!(checkpoint_state(&out), checkpoint_state(&c));
    (base, c, da, dc)
}

/// A shrinks `w` to 250 rows (its last chunk partial); C changes that chunk. Reverting C
/// checks the restored chunk over A's length, not the base's.
#[test]
fn reverting_a_link_over_a_tensor_the_first_link_shrank() {
    let dir = tempfile::tempdir().unwrap();
    let (base, c, da, dc) = shrinking_chain(dir.path(), 250, 250, |_| 0);
    for legacy in [false, true] {
        let [da, dc] = <[PathBuf; 2]>::try_from(written(&[&da, &dc], legacy)).unwrap();
        let mut r = Resident::load(&base).unwrap();
        r.switch_to_chain(&[&da, &dc]).unwrap();
        assert_eq!(state(&r), checkpoint_state(&c));
        r.switch_to_chain(&[&da]).expect("C reverts to A");
        r.switch_to(None).unwrap();
        assert_eq!(state(&r), checkpoint_state(&base));
    }
}

/// A link growing back a tensor the first link shrank. To 64 rows (one chunk) and back to 256
/// rows of zeros: chunks 1..3 are `same`, predicted as zeros beyond A's length, with no
/// hash of A's to reuse. To 250 rows and back to 256 of other values: the rows A
/// dropped must not linger in the slot, where C's added rows would be predicted from them.
#[test]
fn growing_back_a_tensor_the_first_link_shrank() {
    for (a_rows, nonzero) in [(64, false), (250, true)] {
        let fill = |i: usize| if nonzero { (i * 7 % 251) as u8 & 0x3f } else { 0 };
        let dir = tempfile::tempdir().unwrap();
        let (base, c, da, dc) = shrinking_chain(dir.path(), a_rows, 256, fill);
        for legacy in [false, true] {
            let [da, dc] = <[PathBuf; 2]>::try_from(written(&[&da, &dc], legacy)).unwrap();
            let mut r = Resident::load(&base).unwrap();
            r.switch_to(Some(&da)).unwrap();
            let at_a = state(&r);
            r.switch_to_chain(&[&da, &dc]).expect("a valid chain");
            assert_eq!(state(&r), checkpoint_state(&c), "from {a_rows} rows");
            r.switch_to_chain(&[&da]).unwrap();
            assert_eq!(state(&r), at_a, "from {a_rows} rows");
            r.switch_to_chain(&[&da, &dc]).unwrap();
            r.switch_to(None).unwrap();
            assert_eq!(
                state(&r),
                checkpoint_state(&base),
                "from {a_rows} rows, legacy {legacy}"
            );
        }
    }
}

/// Three links: A shrinks `w` to 250 rows, C (A's child) to 200, D (C's child) grows it to
/// 300 (beyond the base's 256), the new rows nonzero; every step and every revert exact.
#[test]
fn shrink_shrink_grow_along_three_links() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (_, c, da, dc) = shrinking_chain(root, 250, 200, |_| 0);
    let base = root.join("base");
    let mut wd = checkpoint_state(&c)["w"].2.clone();
    wd.extend((0..100 * 64).map(|i| (i * 13 % 61) as u8));
    let vd = checkpoint_state(&c)["v"].2.clone();
    let d = root.join("d");
    write_st(
        &d.join("model.safetensors"),
        &[t("w", "BF16", &[300, 32], wd), t("v", "BF16", &[64, 32], vd)],
    );
    let dd = root.join("d.dpk");
    deltapack::make_child(
        &base,
        &[da.clone(), dc.clone()],
        &d,
        &dd,
        &chunks_4k(),
        None,
        &NoProgress,
    )
    .unwrap();
    for legacy in [false, true] {
        let [da, dc, dd] = <[PathBuf; 3]>::try_from(written(&[&da, &dc, &dd], legacy)).unwrap();
        let mut r = Resident::load(&base).unwrap();
        let at_base = state(&r);
        r.switch_to(Some(&da)).unwrap();
        let at_a = state(&r);
        r.switch_to_chain(&[&da, &dc]).unwrap();
        assert_eq!(state(&r), checkpoint_state(&c));
        r.switch_to_chain(&[&da, &dc, &dd]).unwrap();
        assert_eq!(state(&r), checkpoint_state(&d));
        r.switch_to_chain(&[&da, &dc]).unwrap();
        assert_eq!(state(&r), checkpoint_state(&c));
        r.switch_to_chain(&[&da]).unwrap();
        assert_eq!(state(&r), at_a);
        r.switch_to_chain(&[&da, &dc, &dd]).unwrap();
        assert_eq!(state(&r), checkpoint_state(&d));
        r.switch_to(None).unwrap();
        assert_eq!(state(&r), at_base, "legacy {legacy}");
        assert_eq!(r.undo_bytes(), 0);
    }
}

#[test]
fn kept_buffers_switch_alike_and_hold_what_views_saw() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _, da, db) = exact_and_lossy_deltas(dir.path());
    let (want_base, want_a, want_b) = (checkpoint_state(&base), applied(&base, &da), applied(&base, &db));
    let mut r = Resident::load(&base).unwrap();
    r.keep_replaced_buffers();
    let steps: [(Option<&Path>, &State); 5] = [
        (Some(&da), &want_a),
        (Some(&db), &want_b),
        (None, &want_base),
        (Some(&da), &want_a),
        (None, &want_base),
    ];
    let mut replaced_any = false;
    for (i, (delta, want)) in steps.into_iter().enumerate() {
        // What views of the model held before the switch: address -> bytes.
        let seen: BTreeMap<usize, Vec<u8>> = r
            .tensors()
            .map(|t| (t.bytes.as_ptr() as usize, t.bytes.to_vec()))
            .collect();
        r.switch_to(delta).unwrap();
        assert_eq!(state(&r), *want, "step {i}");
        for buf in r.take_replaced_buffers() {
            replaced_any = true;
            if let Some(before) = seen.get(&(buf.as_ptr() as usize)) {
                // A kept buffer is left as its views saw it (its first bytes, at least: a
                // tensor that grew kept its old rows in place).
                assert_eq!(
                    &buf[..before.len().min(buf.len())],
                    &before[..before.len().min(buf.len())],
                    "step {i}"
                );
            }
        }
    }
    assert!(
        replaced_any,
        "the fixture grows, converts and adds tensors: some buffer was replaced"
    );
    assert!(r.take_replaced_buffers().is_empty());
}
