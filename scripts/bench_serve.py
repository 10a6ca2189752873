#!/usr/bin/env python3
"""Serving fine-tunes from packed deltas (issue 20): kernels, decoding steps, memory, cold start.

Everything is measured side by side in one run, medians of repeated timings:

1. **Kernels** at 4096 x 4096, batch 1 (and 8, 64): the packed products (binary and ternary
   sign-axis, 4-bit quant) against torch's dense bf16 product of the same shape and against
   the memory floor, the dense bf16 weight's bytes over the read bandwidth measured in the
   same run. Enough distinct weights rotate through each loop that they do not fit in the
   last-level cache: the deltas come from a synthetic pair of ``--layers`` 4096 x 4096 bf16
   tensors made with ``deltapack make``.
2. **Decoding steps** of a Llama model of TinyLlama's shape (random bf16 weights, every Linear
   of the decoder layers covered by the deltas, embeddings and LM head dense) with 1, 4 and 8
   fine-tunes attached, against the dense base, the dense fine-tune, and hot swap of dense
   fine-tunes per request (``deltapack.Resident``).
3. **Memory** per fine-tune (8 attached) and **cold start** (``attach`` of one ``.dpk`` against
   ``from_pretrained`` of the dense fine-tune's directory).

Generated models and deltas are cached in ``--work``. The results go to ``--json`` and, with
``--doc``, into docs/BENCHMARKS.md between the ``serve`` markers.

    python3 scripts/bench_serve.py --work /work/servebench --json serve.json --doc docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import deltapack
import deltapack.torch as dpt

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TINYLLAMA = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rotating(fn, count: int, repeat: int) -> float:
    """Median milliseconds of ``fn(i)``, ``i`` cycling through ``count`` distinct weights."""
    state = [0]

    def step():
        fn(state[0] % count)
        state[0] += 1

    return median_time(step, repeat) * 1e3


def cli() -> str:
    return str(Path(sys.executable).with_name("deltapack"))


def make_delta(base: Path, ft: Path, out: Path, codec: str) -> None:
    if out.exists():
        return
    subprocess.run(
        [cli(), "make", "--base", str(base), "--finetuned", str(ft), "-o", str(out), "--codec", codec],
        check=True,
        stdout=subprocess.DEVNULL,
    )


# ---------------------------------------------------------------------------------------------
# 1. kernels


def kernel_pair(work: Path, layers: int) -> tuple:
    """A synthetic base and fine-tune of ``layers`` 4096 x 4096 bf16 Linear weights."""
    from safetensors.torch import save_file

    base, ft = work / "k-base", work / "k-ft"
    if (ft / "model.safetensors").exists():
        return base, ft
    base.mkdir(parents=True, exist_ok=True)
    ft.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    b, f = {}, {}
    for i in range(layers):
        w = (torch.randn(4096, 4096, generator=g) * 0.02).to(torch.bfloat16)
        b[f"l{i}.weight"] = w
        f[f"l{i}.weight"] = (w.float() + torch.randn(4096, 4096, generator=g) * 2e-4).to(torch.bfloat16)
    save_file(b, str(base / "model.safetensors"), metadata={"format": "pt"})
    save_file(f, str(ft / "model.safetensors"), metadata={"format": "pt"})
    return base, ft


class Layers(torch.nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"l{i}", torch.nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16))


def read_bandwidth() -> float:
    """Bytes per second torch reads summing a 1 GiB tensor (all threads), median of 5."""
    a = torch.ones(1 << 28, dtype=torch.float32)
    a.sum()
    t = median_time(lambda: a.sum(), 5)
    return a.numel() * 4 / t


def bench_kernels(work: Path, layers: int, repeat: int) -> dict:
    base, ft = kernel_pair(work, layers)
    forms = {
        "binary": "sign-axis:zeros=sign",
        "ternary": "sign-axis:zeros=keep",
        "quant4": "quant:bits=4",
    }
    model = Layers(layers)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(base / "model.safetensors")))
    bw = read_bandwidth()
    floor = 4096 * 4096 * 2 / bw
    out = {"read_bandwidth_gbs": bw / 1e9, "floor_ms": floor * 1e3, "layers": layers, "rows": {}}
    weights = [getattr(model, f"l{i}").weight for i in range(layers)]
    servers = {}
    for name, codec in forms.items():
        delta = work / f"k-{name}.dpk"
        make_delta(base, ft, delta, codec)
        servers[name] = deltapack._native.Server(torch.get_num_threads())
        servers[name].add([str(delta)], str(base), None)
    names = [f"l{i}.weight" for i in range(layers)]
    for n in (1, 8, 64):
        x16 = torch.randn(n, 4096).to(torch.bfloat16)
        xs = x16.float().numpy()
        tenants = np.zeros(n, dtype=np.int64)
        dense = lambda i, x=x16: torch.nn.functional.linear(x, weights[i])  # noqa: E731
        row = {"torch_bf16_ms": rotating(dense, layers, repeat)}
        for name, server in servers.items():
            packed = lambda i, s=server, x=xs, t=tenants: s.matmul(names[i], x, t, 4096)  # noqa: E731
            row[f"{name}_ms"] = rotating(packed, layers, repeat)
        out["rows"][n] = row
    return out


# ---------------------------------------------------------------------------------------------
# 2-3. decoding


def llama_models(work: Path, tenants: int) -> tuple:
    """The TinyLlama-shaped base, one dense fine-tune directory, and ``tenants`` deltas."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = work / "llama-base"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(**TINYLLAMA)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(base)
        del model
        gc.collect()
    deltas, ft0 = [], work / "llama-ft0"
    for t in range(tenants):
        delta = work / f"llama-ft{t}.dpk"
        deltas.append(delta)
        ft = work / f"llama-ft{t}"
        if delta.exists() and (t > 0 or (ft / "config.json").exists()):
            continue
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for m in model.model.layers.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(
                        (m.weight.float() + torch.randn(m.weight.shape, generator=g) * 2e-4).to(torch.bfloat16)
                    )
        model.save_pretrained(ft)
        del model
        gc.collect()
        make_delta(base, ft, delta, "sign-axis:zeros=sign")
        if t > 0:
            subprocess.run(["rm", "-rf", str(ft)], check=True)
    return base, ft0, deltas


def decode_step_time(model, batch: int, repeat: int, prompt: int = 16) -> float:
    """Median seconds of one decoding step with a KV cache after a prompt of ``prompt`` tokens."""
    from transformers import DynamicCache

    ids = torch.randint(0, 32000, (batch, prompt))
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            nxt = out.logits[:, -1:].argmax(-1)
    return statistics.median(times)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bench_decoding(work: Path, repeat: int) -> dict:
    from transformers import AutoModelForCausalLM

    base, ft0, deltas = llama_models(work, 8)
    out = {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    out["base_b1_ms"] = decode_step_time(model, 1, repeat) * 1e3
    out["base_b8_ms"] = decode_step_time(model, 8, repeat) * 1e3

    # Cold start, to the first token: the dense fine-tune's directory loaded (transformers maps
    # it lazily, so the first step pays the reads), against a delta attached to the resident
    # base. The page cache holds both files (warm), as on a server that just wrote them.
    t = time.perf_counter()
    dense_ft = AutoModelForCausalLM.from_pretrained(ft0, dtype=torch.bfloat16).eval()
    out["from_pretrained_ft_s"] = time.perf_counter() - t
    with torch.no_grad():
        dense_ft(input_ids=torch.randint(0, 32000, (1, 1)))
    out["from_pretrained_first_token_s"] = time.perf_counter() - t
    out["dense_ft_b1_ms"] = decode_step_time(dense_ft, 1, repeat) * 1e3
    del dense_ft
    gc.collect()

    t = time.perf_counter()
    h = dpt.attach(model, {"t0": deltas[0]})
    out["attach_one_s"] = time.perf_counter() - t
    with h.use("t0"), torch.no_grad():
        model(input_ids=torch.randint(0, 32000, (1, 1)))
    out["attach_first_token_s"] = time.perf_counter() - t
    with h.use("t0"):
        out["attached_1_b1_ms"] = decode_step_time(model, 1, repeat) * 1e3
    h.detach()

    names = [f"t{i}" for i in range(4)]
    h = dpt.attach(model, {n: d for n, d in zip(names, deltas)})
    with h.use(names + names):
        out["attached_4_b8_ms"] = decode_step_time(model, 8, repeat) * 1e3
    h.detach()
    gc.collect()

    rss0 = rss_mib()
    names8 = [f"t{i}" for i in range(8)]
    h = dpt.attach(model, {n: d for n, d in zip(names8, deltas)})
    mem = h.memory()
    out["rss_growth_8_mib"] = rss_mib() - rss0
    out["packed_bytes_per_tenant"] = statistics.median(m["packed"] for m in mem.values())
    out["covered_weights"] = mem["t0"]["weights"]
    out["bits_per_covered_weight"] = 8 * out["packed_bytes_per_tenant"] / out["covered_weights"]
    out["dense_bytes_per_tenant"] = statistics.median(m["dense"] for m in mem.values())
    with h.use(names8):
        out["attached_8_b8_ms"] = decode_step_time(model, 8, repeat) * 1e3
    h.detach()
    del model
    gc.collect()

    # Hot swap: one resident model switched to each request's fine-tune in turn, its rows run.
    res = deltapack.Resident(base)
    swap_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    res.attach(swap_model)

    def swap_step():
        for d in deltas[:4]:
            res.switch_to(d)
            with torch.no_grad():
                swap_model(input_ids=torch.randint(0, 32000, (2, 1)))
        res.switch_to(None)

    out["hotswap_4_b8_ms"] = median_time(swap_step, max(2, repeat // 4)) * 1e3
    return out


# ---------------------------------------------------------------------------------------------


def build() -> str:
    """The repository's commit, with "+changes" when the tree differs from it."""
    run = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return run("rev-parse", "--short", "HEAD") + ("+changes" if run("status", "--porcelain") else "")


def ratio(d: dict, key: str) -> str:
    return f"{d[key] / d['base_b8_ms']:.2f}x"


def table(k: dict, d: dict) -> str:
    floor = k["floor_ms"]
    lines = [
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; read bandwidth {k['read_bandwidth_gbs']:.1f} GB/s, so the memory floor of "
        f"a dense bf16 4096 x 4096 product is {floor:.3f} ms.",
        "",
        "| rows | torch dense bf16 | binary sign-axis | ternary sign-axis | quant 4-bit |",
        "|---|---|---|---|---|",
    ]
    for n, r in k["rows"].items():
        cells = [f"{r['torch_bf16_ms']:.3f} ms ({r['torch_bf16_ms'] / floor:.2f}x)"]
        cells += [f"{r[f + '_ms']:.3f} ms ({r[f + '_ms'] / floor:.2f}x)" for f in ("binary", "ternary", "quant4")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Decoding steps, TinyLlama shape (1.1 B parameters, bf16), median ms per step; the deltas are",
        "binary `sign-axis:zeros=sign` over every Linear of the decoder layers:",
        "",
        "| | batch 1 | batch 8 |",
        "|---|---|---|",
        f"| dense base | {d['base_b1_ms']:.1f} | {d['base_b8_ms']:.1f} |",
        f"| dense fine-tune | {d['dense_ft_b1_ms']:.1f} | |",
        f"| attached, 1 fine-tune | {d['attached_1_b1_ms']:.1f} ({d['attached_1_b1_ms'] / d['base_b1_ms']:.2f}x) | |",
        f"| attached, 4 fine-tunes (2 rows each) | | {d['attached_4_b8_ms']:.1f} ({ratio(d, 'attached_4_b8_ms')}) |",
        f"| attached, 8 fine-tunes (1 row each) | | {d['attached_8_b8_ms']:.1f} ({ratio(d, 'attached_8_b8_ms')}) |",
        f"| hot swap per request, 4 fine-tunes | | {d['hotswap_4_b8_ms']:.0f} |",
        "",
        f"Memory: {d['bits_per_covered_weight']:.3f} bits per covered weight per fine-tune "
        f"({d['packed_bytes_per_tenant'] / 2**20:.1f} MiB packed for {d['covered_weights'] / 1e6:.0f} M weights, "
        f"{d['dense_bytes_per_tenant'] / 2**20:.2f} MiB dense); the process grew {d['rss_growth_8_mib']:.0f} MiB "
        "with 8 attached.",
        "",
        f"Cold start: `attach` of one `.dpk` to the resident base takes {d['attach_one_s']:.2f} s "
        f"({d['attach_first_token_s']:.2f} s to the first token); `from_pretrained` of the dense fine-tune's "
        f"directory {d['from_pretrained_ft_s']:.2f} s ({d['from_pretrained_first_token_s']:.2f} s to the first "
        f"token): {d['attach_first_token_s'] / d['from_pretrained_first_token_s']:.2f}x to the first token.",
        "",
        f"Environment: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, kernel threads = torch's.",
        "",
        f"<sub>Generated by `python3 scripts/bench_serve.py --work WORK --doc docs/BENCHMARKS.md` on build "
        f"{build()}, {time.strftime('%Y-%m-%d')}.</sub>",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="cache of generated models and deltas")
    ap.add_argument("--layers", type=int, default=32, help="distinct 4096 x 4096 weights rotated in the kernel loop")
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--skip-decoding", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--doc", type=Path, help="write the tables into this markdown file between the serve markers")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    k = bench_kernels(args.work, args.layers, args.repeat)
    print(json.dumps(k, indent=1), flush=True)
    d = {} if args.skip_decoding else bench_decoding(args.work, max(5, args.repeat // 2))
    print(json.dumps(d, indent=1), flush=True)
    result = {"kernels": k, "decoding": d}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if d:
        text = table(k, d)
        print(text)
        if args.doc:
            from doc_tables import replace_between

            replace_between(args.doc, "serve", text + "\n")


if __name__ == "__main__":
    main()
