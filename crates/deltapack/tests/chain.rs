//! Chains, squash, rebase and the store, on a small synthetic training history.

mod common;

use std::path::{Path, PathBuf};

use common::{files, noise, t, write_st};
use deltapack::checkpoint::Checkpoint;
use deltapack::progress::NoProgress;
use deltapack::store::Store;
use deltapack::tune::{CodecPolicy, CodecSpec};
use deltapack::{apply_chain, verify_chain, ApplyOptions, Chain, Error, MakeOptions};
use deltapack::{make_child, rebase, squash};

const N: usize = 20_000;

/// bf16 weights, then each checkpoint moves a third of them by a few ULPs from the one
/// before; the third checkpoint grows the embedding by 8 rows and changes the tokenizer.
fn history(root: &Path) -> (PathBuf, Vec<PathBuf>) {
    let r = noise(7, 2 * N);
    let mut w: Vec<u16> = (0..N)
        .map(|i| half::bf16::from_f32((r[i] as f32 - 127.5) / 127.5 * 0.04).to_bits())
        .collect();
    let emb: Vec<u16> = (0..64 * 16)
        .map(|i| half::bf16::from_f32(i as f32 * 1e-3).to_bits())
        .collect();
    let write = |dir: &Path, w: &[u16], rows: usize, tok: &str| {
        let bytes = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut e = emb.clone();
        e.resize(rows * 16, half::bf16::from_f32(0.5).to_bits());
        write_st(
            &dir.join("model.safetensors"),
            &[
                t("model.embed_tokens.weight", "BF16", &[rows, 16], bytes(&e)),
                t("model.layers.0.w", "BF16", &[100, N / 100], bytes(w)),
            ],
        );
        std::fs::write(dir.join("config.json"), br#"{"hidden_size": 16}"#).unwrap();
        std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    };
    let base = root.join("base");
    write(&base, &w, 64, "{\"vocab\": 64}");
    let mut cks = Vec::new();
    for step in 1..=4u64 {
        let r = noise(100 + step, N);
        for (x, &n) in w.iter_mut().zip(&r) {
            if n % 3 == 0 {
                *x = (*x as i16).wrapping_add([1i16, -1, 2, -2][(n % 4) as usize]) as u16;
            }
        }
        let dir = root.join(format!("step-{step}"));
        let (rows, tok) = if step >= 3 {
            (72, "{\"vocab\": 72}")
        } else {
            (64, "{\"vocab\": 64}")
        };
        write(&dir, &w, rows, tok);
        cks.push(dir);
    }
    (base, cks)
}

fn small_chunks() -> MakeOptions {
    MakeOptions {
        chunk_bytes: 4096,
        ..Default::default()
    }
}

/// Makes the chain of deltas of `cks`, each against the one before.
fn chain_of(base: &Path, cks: &[PathBuf], work: &Path, opts: &MakeOptions) -> Vec<PathBuf> {
    let mut deltas = Vec::new();
    for (i, ck) in cks.iter().enumerate() {
        let out = work.join(format!("d{i}.dpk"));
        make_child(base, &deltas, ck, &out, opts, None, &NoProgress).unwrap();
        deltas.push(out);
    }
    deltas
}

fn rebuilt(base: &Path, deltas: &[PathBuf], out: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    apply_chain(base, deltas, out, &ApplyOptions::default(), &NoProgress).unwrap();
    files(out)
}

#[test]
fn every_link_of_a_chain_rebuilds_its_checkpoint_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cks) = history(dir.path());
    let deltas = chain_of(&base, &cks, dir.path(), &small_chunks());
    for k in 1..=cks.len() {
        let out = dir.path().join(format!("out{k}"));
        assert_eq!(rebuilt(&base, &deltas[..k], &out), files(&cks[k - 1]), "checkpoint {k}");
        let chain = Chain::open(&base, &deltas[..k]).unwrap();
        let r = verify_chain(&chain, Some(&cks[k - 1]), &NoProgress).unwrap();
        assert_eq!((r.chain_length, r.compared_with_finetuned), (k, true));
    }
    // A child codes only what changed since its parent: smaller than its delta against the base.
    let direct = dir.path().join("direct.dpk");
    deltapack::make(&base, &cks[1], &direct, &small_chunks(), &NoProgress).unwrap();
    assert!(std::fs::metadata(&deltas[1]).unwrap().len() < std::fs::metadata(&direct).unwrap().len());
}

#[test]
fn a_broken_link_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cks) = history(dir.path());
    let d = chain_of(&base, &cks[..3], dir.path(), &small_chunks());
    let wrong_parent = |chain: &[PathBuf]| {
        let err = Chain::open(&base, chain).err().expect("refused");
        assert!(matches!(err, Error::WrongParent { .. }), "{err}");
        err.to_string()
    };
    assert!(wrong_parent(&[d[1].clone()]).contains("not the base"));
    assert!(wrong_parent(&[d[0].clone(), d[2].clone()]).contains("give its own parent chain"));
    assert!(wrong_parent(&[d[1].clone(), d[0].clone()]).contains("not the base"));
    assert!(wrong_parent(&[d[0].clone(), d[1].clone(), d[0].clone()]).contains("made against a base"));
    // A chain on the wrong base fails on the base's fingerprint, and leaves no output.
    let out = dir.path().join("out");
    let err = apply_chain(&cks[0], &d, &out, &ApplyOptions::default(), &NoProgress).unwrap_err();
    assert!(matches!(err, Error::WrongBase { .. }), "{err}");
    assert!(!out.exists());
}

#[test]
fn squash_and_rebase_rebuild_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cks) = history(dir.path());
    let d = chain_of(&base, &cks, dir.path(), &small_chunks());
    let squashed = dir.path().join("squashed.dpk");
    squash(&base, &d, &squashed, &MakeOptions::default(), &NoProgress).unwrap();
    assert_eq!(
        rebuilt(&base, std::slice::from_ref(&squashed), &dir.path().join("o1")),
        files(&cks[3])
    );
    // Rebased onto checkpoint 1 as a new base.
    let rebased = dir.path().join("rebased.dpk");
    rebase(&base, &d, &cks[0], &rebased, &MakeOptions::default(), &NoProgress).unwrap();
    assert_eq!(rebuilt(&cks[0], &[rebased], &dir.path().join("o2")), files(&cks[3]));
    // FastChat-style export of the chain equals that of the squashed delta.
    let export = |deltas: &[PathBuf], out: &str| {
        let out = dir.path().join(out);
        deltapack::export_additive(&base, deltas, &out, &Default::default(), &NoProgress).unwrap();
        files(&out)
    };
    assert_eq!(export(&d, "x1"), export(&[squashed], "x2"));
}

#[test]
fn a_lossy_chain_codes_each_link_against_the_rebuilt_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cks) = history(dir.path());
    let e = 0.3;
    let opts = MakeOptions {
        codecs: CodecPolicy {
            default: CodecSpec::Auto,
            max_error: Some(e),
            ..Default::default()
        },
        ..small_chunks()
    };
    let d = chain_of(&base, &cks, dir.path(), &opts);
    let w = |p: &Path| {
        let ck = deltapack::checkpoint::Checkpoint::open(p).unwrap();
        let t = ck.tensor("model.layers.0.w").unwrap();
        ck.bytes(t)
            .chunks(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect::<Vec<f64>>()
    };
    let norm = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let truth0 = w(&base);
    for k in 1..=cks.len() {
        let out = dir.path().join(format!("out{k}"));
        apply_chain(&base, &d[..k], &out, &ApplyOptions::default(), &NoProgress).unwrap();
        let (got, truth) = (w(&out), w(&cks[k - 1]));
        // Closed loop: the last link's error stays within the budget of its own delta, and
        // measured against the whole change since the base it does not grow with k.
        let chain = Chain::open(&base, &d[..k]).unwrap();
        let r = verify_chain(&chain, Some(&cks[k - 1]), &NoProgress).unwrap();
        assert!(r.measured_error <= e + 1e-9, "link {k}: {}", r.measured_error);
        let total = norm(&got, &truth) / norm(&truth, &truth0);
        assert!(total <= e, "checkpoint {k}: error {total} against the whole change");
    }
}

fn store_files(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = files(root).into_keys().filter(|k| k != "lock").collect();
    v.sort();
    v
}

#[test]
fn the_store_chains_checkpoints_dedups_aux_files_and_reparents() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cks) = history(dir.path());
    let root = dir.path().join("store");
    let store = Store::init(&root, &base, Some("base")).unwrap();
    let opts = small_chunks();
    for (i, ck) in cks.iter().enumerate() {
        let (e, _) = store.add(&format!("s{i}"), ck, None, &opts, &NoProgress).unwrap();
        // The predecessor is chosen as parent without being told.
        let expect = i.checked_sub(1).map(|p| format!("s{p}"));
        assert_eq!(e.parent, expect, "parent of s{i}");
    }
    let m = store.manifest().unwrap();
    assert_eq!(m.entries.len(), 4);
    // Two distinct tokenizers and one config, each kept once.
    assert_eq!(std::fs::read_dir(root.join("aux")).unwrap().count(), 3);
    for (i, ck) in cks.iter().enumerate() {
        let out = dir.path().join(format!("get{i}"));
        store.get(&format!("s{i}"), &out, false, &NoProgress).unwrap();
        assert_eq!(files(&out), files(ck), "s{i}");
    }
    let err = store.remove("s1", false, &NoProgress).unwrap_err();
    assert!(err.to_string().contains("reparenting"), "{err}");
    assert_eq!(store.remove("s1", true, &NoProgress).unwrap(), vec!["s2".to_string()]);
    let m = store.manifest().unwrap();
    assert_eq!(
        m.entries.iter().find(|e| e.name == "s2").unwrap().parent.as_deref(),
        Some("s0")
    );
    for i in [0, 2, 3] {
        let out = dir.path().join(format!("again{i}"));
        store.get(&format!("s{i}"), &out, false, &NoProgress).unwrap();
        assert_eq!(files(&out), files(&cks[i]), "s{i} after removing s1");
    }
    let before = store_files(&root);
    let r = store.fsck(&NoProgress).unwrap();
    assert_eq!((r.entries, r.leftovers_removed), (3, 0));
    assert_eq!(store_files(&root), before);
    // Leftovers of an interrupted operation are removed by the next one.
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::write(root.join("tmp/half-written.dpk"), b"x").unwrap();
    std::fs::write(root.join("deltas/orphan.dpk"), b"x").unwrap();
    assert_eq!(store.fsck(&NoProgress).unwrap().leftovers_removed, 2);
    assert_eq!(store_files(&root), before);
}

/// A resident base follows a store's history checkpoint by checkpoint, one link a step,
/// holding at each what `store get` writes, and goes back to the base bit for bit.
#[test]
fn hot_swap_walks_a_store_history_one_link_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cks) = history(dir.path());
    let store = Store::init(&dir.path().join("store"), &base, Some("base")).unwrap();
    for (i, ck) in cks.iter().enumerate() {
        store
            .add(&format!("s{i}"), ck, None, &small_chunks(), &NoProgress)
            .unwrap();
    }
    let mut model = deltapack::hotswap::Resident::load(&base).unwrap();
    let weights = |m: &deltapack::hotswap::Resident| -> Vec<(String, Vec<u8>)> {
        m.tensors().map(|t| (t.name.to_string(), t.bytes.to_vec())).collect()
    };
    let at_base = weights(&model);
    for (i, ck) in cks.iter().enumerate() {
        let (b, chain) = store.chain(&format!("s{i}")).unwrap();
        assert_eq!(b, dir.path().join("store/bases/base"));
        assert_eq!(chain.len(), i + 1, "s{i} continues s{}", i.saturating_sub(1));
        let report = model.switch_to_chain(&chain).unwrap();
        assert_eq!(report.reverted_chunks, 0, "s{i}: only the new link is applied");
        let ck = Checkpoint::open(ck).unwrap();
        let want: Vec<(String, Vec<u8>)> = ck
            .tensors
            .iter()
            .map(|t| (t.name.clone(), ck.bytes(t).to_vec()))
            .collect();
        assert_eq!(weights(&model), want, "s{i}");
    }
    model.switch_to(None).unwrap();
    assert_eq!(weights(&model), at_base);
}

#[test]
fn a_store_refuses_bad_names_and_a_tampered_delta() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cks) = history(dir.path());
    let root = dir.path().join("store");
    let store = Store::init(&root, &base, Some("base")).unwrap();
    for bad in ["../x", "a/b", ".hidden", ""] {
        assert!(
            store.add(bad, &cks[0], None, &small_chunks(), &NoProgress).is_err(),
            "{bad:?}"
        );
    }
    let (e, _) = store.add("s0", &cks[0], None, &small_chunks(), &NoProgress).unwrap();
    assert!(store.add("s0", &cks[1], None, &small_chunks(), &NoProgress).is_err());
    let p = root.join(&e.file);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    assert!(matches!(
        store.fsck(&NoProgress).unwrap_err(),
        Error::CorruptDelta { .. }
    ));
}

/// The tensors of `dir`'s weight files, by name.
fn tensors_of(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let ck = Checkpoint::open(dir).unwrap();
    ck.tensors
        .iter()
        .map(|t| (t.name.clone(), ck.bytes(t).to_vec()))
        .collect()
}

#[test]
fn load_chain_rebuilds_in_memory_what_apply_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cks) = history(dir.path());
    let lossy = MakeOptions {
        codecs: CodecPolicy {
            default: CodecSpec::Auto,
            max_error: Some(0.3),
            ..Default::default()
        },
        ..small_chunks()
    };
    for (name, opts) in [("exact", small_chunks()), ("lossy", lossy)] {
        let work = dir.path().join(name);
        std::fs::create_dir(&work).unwrap();
        let d = chain_of(&base, &cks, &work, &opts);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for k in 1..=d.len() {
                let out = work.join(format!("out{k}-{threads}"));
                let written = pool.install(|| {
                    apply_chain(&base, &d[..k], &out, &ApplyOptions::default(), &NoProgress).unwrap();
                    tensors_of(&out)
                });
                let chain = Chain::open(&base, &d[..k]).unwrap();
                let model = pool.install(|| deltapack::load_chain(&chain, &NoProgress).unwrap());
                let loaded: std::collections::BTreeMap<String, Vec<u8>> =
                    model.tensors.into_iter().map(|t| (t.name, t.bytes)).collect();
                assert_eq!(loaded, written, "{name} link {k}, {threads} threads");
            }
        }
    }
}
