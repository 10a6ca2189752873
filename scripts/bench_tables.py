#!/usr/bin/env python3
"""Markdown tables from a scripts/bench.sh run (its WORKDIR/bench-results.jsonl).

Usage::

    scripts/bench_tables.py RESULTS.jsonl headline|exact

``headline`` is the README's table (sizes against the peers, times); ``exact`` the one of
docs/BENCHMARKS.md (bounds, floors, memory). Peers not run by bench.sh in this run are taken
from scripts/peer_sizes.csv and marked. bench.sh calls this with TABLES=1.
"""

from __future__ import annotations

import csv
import json
import os
import sys

LABELS = {
    "ft-a-bf16": "`ft-a-bf16`: real bf16 fine-tune (MiniLM, 22.7M params)",
    "ft-b-bf16-sharded": "`ft-b-bf16-sharded`: 8 tokens added, 3 shards",
    "reference": "reference pair: Qwen2.5-0.5B shapes, synthetic `N(0, 0.001)` delta",
}
PEERS = [("z4ai", "z4ai 0.2.0"), ("zipnn", "zipnn 0.5.4")]


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100e6 else f"{n / 1e6:.2f} MB"


def load(path: str):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "peer_sizes.csv")) as f:
        recorded = {(r["pair"], r["peer"]): r for r in csv.DictReader(f)}
    for r in rows:
        r["peers"] = json.loads(r["peers"])
        r["bounds"] = json.loads(r["bounds"])
        for k in ("ft_bytes", "weight_bytes", "delta_bytes", "make_rss", "apply_rss", "verify_rss"):
            r[k] = int(r[k])
        for k in ("make_s", "apply_s", "verify_s", "cat_s", "cp_s"):
            r[k] = float(r[k])
        # peer -> (ratio, compressed bytes, measured in this run, note)
        r["peer_sizes"] = {}
        for name, _ in PEERS:
            if name in r["peers"]:
                p = r["peers"][name]
                r["peer_sizes"][name] = (p["ratio"], p["compressed_bytes"], True, "")
            elif (r["pair"], name) in recorded:
                p = recorded[(r["pair"], name)]
                ratio = float(p["ratio"])
                size = int(p["compressed_bytes"]) if p["compressed_bytes"] else r["weight_bytes"] / ratio
                r["peer_sizes"][name] = (ratio, size, False, p["measured"])
    return rows


def load_note(rows) -> str:
    """The machine's load when the pairs were measured, since it is shared."""
    loads = [float(r["load"]) for r in rows if "load" in r]
    if not loads:
        return ""
    lo, hi = min(loads), max(loads)
    span = f"{lo:.1f}" if hi - lo < 0.1 else f"{lo:.1f} to {hi:.1f}"
    busy = " (other work was running, so the times are inflated)" if hi > 2.5 else ""
    return f"Load average {span} at the start of each pair, on {os.cpu_count()} cores{busy}. "


def headline(rows) -> str:
    out = [
        "| pair | fine-tune | deltapack (exact) | "
        + " | ".join(n for _, n in PEERS)
        + " | vs best peer | make | apply |",
        "|---|---|---|" + "---|" * len(PEERS) + "---|---|---|",
    ]
    recorded = False
    for r in rows:
        cells = [
            LABELS.get(r["pair"], r["pair"]),
            mb(r["ft_bytes"]),
            f"{mb(r['delta_bytes'])} (**{r['ft_bytes'] / r['delta_bytes']:.2f}x**)",
        ]
        best = None
        for name, _ in PEERS:
            if name not in r["peer_sizes"]:
                cells.append("-")
                continue
            ratio, size, measured, _ = r["peer_sizes"][name]
            recorded |= not measured
            cells.append(f"{ratio:.2f}x" + ("" if measured else " †"))
            best = size if best is None else min(best, size)
        cells.append(f"**{best / r['delta_bytes']:.2f}x** smaller" if best else "-")
        cells += [f"{r['make_s']:.2f} s", f"{r['apply_s']:.2f} s"]
        out.append("| " + " | ".join(cells) + " |")
    speed = []
    for r in rows:
        for name, label in PEERS:
            if name in r["peers"]:
                p = r["peers"][name]
                runs = int(r.get("peer_repeats", 0))
                runs = "one run" if runs == 1 else f"medians of {runs}" if runs else "medians"
                speed.append(
                    f"on {'the reference pair' if r['pair'] == 'reference' else r['pair']}, {label} compressed in "
                    f"{p['compress_s']:.2f} s and decompressed in {p['decompress_s']:.2f} s, in memory ({runs}), so "
                    f"make was {p['compress_s'] / r['make_s']:.1f}x faster and apply, which also writes the files, "
                    f"{p['decompress_s'] / r['apply_s']:.1f}x"
                )
    out.append("")
    if speed:
        out.append("In the same run, " + "; ".join(speed) + ".")
        out.append("")
    out.append(
        load_note(rows)
        + "Ratios are the fine-tune's size over the compressed size. The peers compress the weights file "
        "alone (`model.safetensors`; they need one file of the same layout on both sides), deltapack "
        'every file of the fine-tune; "vs best peer" compares the peer\'s output for the weights with '
        "deltapack's delta for everything. make and apply: medians, 2-core VM, warm page cache; apply "
        "checks every fingerprint and writes every file."
        + (
            " † From `scripts/peer_sizes.csv` (a peer's size does not depend on deltapack's build), "
            "not measured in this run."
            if recorded
            else ""
        )
    )
    return "\n".join(out) + "\n"


def exact(rows) -> str:
    out = [
        "| pair | ratio | bound (exponent context) | unchanged values | make (x floor) | apply (x floor) | verify "
        "| peak RSS make / apply / verify | peers: ratio, compress / decompress in memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["bounds"]
        peers = []
        for name, label in PEERS:
            if name in r["peers"]:
                p = r["peers"][name]
                peers.append(f"{label} {p['ratio']:.2f}x, {p['compress_s']:.2f} / {p['decompress_s']:.2f} s")
            elif name in r["peer_sizes"]:
                peers.append(f"{label} {r['peer_sizes'][name][0]:.2f}x (recorded)")
        cells = [
            LABELS.get(r["pair"], r["pair"]),
            f"**{r['ft_bytes'] / r['delta_bytes']:.3f}x** ({mb(r['delta_bytes'])})",
            f"{b['exponent_context_ratio']:.2f}x"
            + (" (same-shape tensors only)" if b["bytes"] < 0.9 * r["weight_bytes"] else ""),
            f"{100 * b['unchanged']:.0f} %",
            f"{r['make_s']:.2f} s ({r['make_s'] / r['cat_s']:.1f}x)" if r["cat_s"] > 0 else f"{r['make_s']:.2f} s",
            f"{r['apply_s']:.2f} s ({r['apply_s'] / r['cp_s']:.1f}x)" if r["cp_s"] > 0 else f"{r['apply_s']:.2f} s",
            f"{r['verify_s']:.2f} s",
            f"{r['make_rss'] // 1024} / {r['apply_rss'] // 1024} / {r['verify_rss'] // 1024} MB",
            "; ".join(peers) or "-",
        ]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", load_note(rows).strip()]
    return "\n".join(out) + "\n"


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[2] not in ("headline", "exact"):
        raise SystemExit(__doc__)
    rows = load(sys.argv[1])
    if not rows:
        raise SystemExit("bench_tables.py: no results")
    sys.stdout.write(headline(rows) if sys.argv[2] == "headline" else exact(rows))


if __name__ == "__main__":
    main()
