//! Synthetic checkpoint pairs for the demo, the CLI tests and the benchmarks (`dev synth`).
//!
//! A base holds `bf16(W)` and its fine-tune `bf16(W + E)`, with `W ~ N(0, weight_std)` and
//! `E ~ N(0, delta_std)` drawn in f32 from fixed seeds, per tensor and chunk, so any machine
//! makes the same bytes. The reference pair of the benchmark has Qwen2.5-0.5B's shapes.

use std::io::Write;
use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use deltapack::{Error, Result};

/// Shapes and distributions of a synthetic decoder-only model pair.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Transformer layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Width of the k and v projections (KV heads x head size).
    pub kv_dim: usize,
    /// Vocabulary of the base.
    pub vocab: usize,
    /// Rows the fine-tune adds to the embedding (a vocabulary resize).
    pub added_tokens: usize,
    /// Whether the fine-tune has its own `lm_head.weight` (the base ties it to the embedding).
    pub untie_lm_head: bool,
    /// Standard deviation of the weights.
    pub weight_std: f32,
    /// Standard deviation of the fine-tuning change.
    pub delta_std: f32,
    /// Seed of all draws.
    pub seed: u64,
}

impl Spec {
    /// The benchmark's reference pair: Qwen2.5-0.5B shapes, W ~ N(0, 0.02), E ~ N(0, 0.001).
    pub fn reference() -> Spec {
        Spec {
            layers: 24,
            hidden: 896,
            intermediate: 4864,
            kv_dim: 128,
            vocab: 151_936,
            added_tokens: 0,
            untie_lm_head: false,
            weight_std: 0.02,
            delta_std: 0.001,
            seed: 20_261_124,
        }
    }

    /// A small pair that exercises everything: sharding, vocabulary resize, an untied head,
    /// and a change small enough that most bf16 values round to the base's, as in real fine-tunes.
    pub fn demo() -> Spec {
        Spec {
            layers: 4,
            hidden: 256,
            intermediate: 688,
            kv_dim: 64,
            vocab: 4096,
            added_tokens: 8,
            untie_lm_head: true,
            weight_std: 0.02,
            delta_std: 0.0001,
            seed: 7,
        }
    }

    /// Tensor names and shapes, in file order; `finetuned` selects the fine-tune's list.
    pub fn tensors(&self, finetuned: bool) -> Vec<(String, Vec<usize>)> {
        let (h, i, kv) = (self.hidden, self.intermediate, self.kv_dim);
        let vocab = self.vocab + if finetuned { self.added_tokens } else { 0 };
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let entries: [(&str, Vec<usize>); 12] = [
                ("input_layernorm.weight", vec![h]),
                ("self_attn.q_proj.weight", vec![h, h]),
                ("self_attn.q_proj.bias", vec![h]),
                ("self_attn.k_proj.weight", vec![kv, h]),
                ("self_attn.k_proj.bias", vec![kv]),
                ("self_attn.v_proj.weight", vec![kv, h]),
                ("self_attn.v_proj.bias", vec![kv]),
                ("self_attn.o_proj.weight", vec![h, h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
            ];
            v.extend(entries.into_iter().map(|(n, s)| (format!("{p}.{n}"), s)));
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if finetuned && self.untie_lm_head {
            v.push(("lm_head.weight".to_string(), vec![vocab, h]));
        }
        v
    }
}

const GEN_CHUNK: usize = 1 << 20;

/// Generates bf16 values of tensor `seed_name` for elements `range`, base or fine-tune.
fn values(spec: &Spec, seed_name: &str, range: std::ops::Range<usize>, finetuned: bool, out: &mut Vec<u8>) {
    let key = blake3::hash(seed_name.as_bytes());
    let tensor_seed = u64::from_le_bytes(key.as_bytes()[..8].try_into().expect("8 bytes")) ^ spec.seed;
    let first = range.start / GEN_CHUNK;
    for c in first..range.end.div_ceil(GEN_CHUNK) {
        let mut rng = ChaCha8Rng::seed_from_u64(tensor_seed.wrapping_add(c as u64));
        let lo = (c * GEN_CHUNK).max(range.start);
        let hi = ((c + 1) * GEN_CHUNK).min(range.end);
        for i in c * GEN_CHUNK..hi {
            let w: f32 = StandardNormal.sample(&mut rng);
            let e: f32 = StandardNormal.sample(&mut rng);
            if i < lo {
                continue;
            }
            let v = w * spec.weight_std + if finetuned { e * spec.delta_std } else { 0.0 };
            out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
        }
    }
}

/// Writes one checkpoint of the pair into `dir` (created), in `shards` files.
pub fn write_model(spec: &Spec, dir: &Path, finetuned: bool, shards: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let tensors = spec.tensors(finetuned);
    let per_shard = tensors.len().div_ceil(shards.max(1));
    let groups: Vec<_> = tensors.chunks(per_shard).collect();
    let mut weight_map = serde_json::Map::new();
    for (k, group) in groups.iter().enumerate() {
        let name = if groups.len() == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, groups.len())
        };
        for (t, _) in group.iter() {
            weight_map.insert(t.clone(), name.clone().into());
        }
        write_safetensors(spec, &dir.join(&name), group, finetuned)?;
    }
    if groups.len() > 1 {
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        write_text(
            &dir.join("model.safetensors.index.json"),
            &serde_json::to_string_pretty(&index).expect("json"),
        )?;
    }
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "vocab_size": spec.vocab + if finetuned { spec.added_tokens } else { 0 },
        "tie_word_embeddings": !(finetuned && spec.untie_lm_head), "torch_dtype": "bfloat16",
    });
    write_text(
        &dir.join("config.json"),
        &serde_json::to_string_pretty(&config).expect("json"),
    )?;
    let vocab: serde_json::Map<String, serde_json::Value> = (0..spec.vocab
        + if finetuned { spec.added_tokens } else { 0 })
        .map(|i| (format!("tok{i}"), i.into()))
        .collect();
    let tok = serde_json::json!({"version": "1.0", "model": {"type": "BPE", "vocab": vocab}});
    write_text(&dir.join("tokenizer.json"), &serde_json::to_string(&tok).expect("json"))
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io("writing", path, e))
}

fn write_safetensors(spec: &Spec, path: &Path, tensors: &[(String, Vec<usize>)], finetuned: bool) -> Result<()> {
    let layout: Vec<(&str, deltapack::Dtype, &[usize])> = tensors
        .iter()
        .map(|(name, shape)| (name.as_str(), deltapack::Dtype::BF16, shape.as_slice()))
        .collect();
    let (header, _) = deltapack::checkpoint::header::build(Some(serde_json::json!({"format": "pt"})), &layout)?;
    let file = std::fs::File::create(path).map_err(|e| Error::io("creating", path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io("writing", path, e);
    w.write_all(&header).map_err(io)?;
    for (name, shape) in tensors {
        let n: usize = shape.iter().product();
        // An untied head starts from the embedding it was tied to, as in real fine-tunes.
        let seed_name = if name == "lm_head.weight" {
            "model.embed_tokens.weight"
        } else {
            name.as_str()
        };
        let pieces: Vec<Vec<u8>> = (0..n.div_ceil(GEN_CHUNK * 4))
            .into_par_iter()
            .map(|k| {
                let mut out = Vec::new();
                let r = k * GEN_CHUNK * 4..((k + 1) * GEN_CHUNK * 4).min(n);
                values(spec, seed_name, r, finetuned, &mut out);
                out
            })
            .collect();
        for p in pieces {
            w.write_all(&p).map_err(io)?;
        }
    }
    w.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_has_qwen_shapes() {
        let s = Spec::reference();
        assert_eq!(s.tensors(false).len(), 290);
        let values: usize = s.tensors(false).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(values, 494_032_768);
    }

    #[test]
    fn values_do_not_depend_on_how_ranges_are_cut() {
        let s = Spec::demo();
        let mut whole = Vec::new();
        values(&s, "x", 0..(GEN_CHUNK + 10), true, &mut whole);
        let mut parts = Vec::new();
        values(&s, "x", 0..7, true, &mut parts);
        values(&s, "x", 7..(GEN_CHUNK + 10), true, &mut parts);
        assert_eq!(whole, parts);
    }
}
