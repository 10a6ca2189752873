#!/usr/bin/env python3
"""Measure the zipnn (and optionally z4ai) XOR-delta peers on one checkpoint pair.

Usage::

    python peer_zipnn.py BASE.safetensors FT.safetensors [--threads 2] [--repeat 3] [--json] [--z4ai]
                         [--peers zipnn,z4ai]

Both files are read into memory first (not timed). Then, for each repetition:

* zipnn 0.5.4: ``ZipNN(method="HUFFMAN", input_format="byte", bytearray_dtype="bfloat16",
  threads=N, delta_compressed_type="byte")``; ``compress(ft, delta_second_data=base)`` and
  ``decompress(blob, delta_second_data=base)``. ``compress`` mutates its inputs, so every call
  gets fresh ``bytearray`` copies, made outside the timed region.
``--peers`` names the peers to run (default ``zipnn``; ``--z4ai`` adds z4ai). z4ai needs only
numpy and zstandard, so ``--peers z4ai`` runs without torch.

* z4ai 0.2.0 (with ``--z4ai`` or ``--peers z4ai``): ``z4ai.model_delta.compress(ft, base, threads=N)`` and
  ``decompress(blob, base)`` on immutable ``bytes``.

Each decompressed output is checked byte for byte against the fine-tune (outside the timed
region); a mismatch exits with status 1. Reported: median compress seconds, median decompress
seconds, compressed size in bytes, and ratio = fine-tune size / compressed size.

The peers are not deltapack dependencies; run this with the peers venv described in
``PEERS.md`` (zipnn imports torch at module load, so that venv needs torch even on CPU).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

# torch (imported by zipnn at module load) emits FutureWarnings that are noise here.
warnings.filterwarnings("ignore", category=FutureWarning)

Compress = Callable[[], bytes]


def measure(
    name: str,
    ft: bytes,
    repeat: int,
    prepare_compress: Callable[[], Compress],
    prepare_decompress: Callable[[bytes], Callable[[], bytes]],
) -> dict:
    """Time ``repeat`` compress/decompress round trips and verify each output.

    ``prepare_compress()`` returns a zero-argument call with its input copies already made;
    ``prepare_decompress(blob)`` likewise. Only the returned calls are timed.
    """
    comp_s: list[float] = []
    decomp_s: list[float] = []
    size = None
    for _ in range(repeat):
        run = prepare_compress()
        t0 = time.perf_counter()
        blob = run()
        comp_s.append(time.perf_counter() - t0)

        run = prepare_decompress(blob)
        t0 = time.perf_counter()
        out = run()
        decomp_s.append(time.perf_counter() - t0)

        if bytes(out) != ft:
            sys.exit(f"{name}: decompressed output differs from the fine-tune")
        if size is not None and len(blob) != size:
            sys.exit(f"{name}: compressed size changed between repetitions")
        size = len(blob)
        del blob, out, run
    return {
        "version": importlib.metadata.version(name),
        "compressed_bytes": size,
        "ratio": len(ft) / size,
        "compress_s": statistics.median(comp_s),
        "decompress_s": statistics.median(decomp_s),
        "compress_s_all": comp_s,
        "decompress_s_all": decomp_s,
        "verified": True,
    }


def run_zipnn(base: bytes, ft: bytes, threads: int, repeat: int) -> dict:
    import zipnn

    z = zipnn.ZipNN(
        method="HUFFMAN",
        input_format="byte",
        bytearray_dtype="bfloat16",
        threads=threads,
        delta_compressed_type="byte",
    )

    def prepare_compress() -> Compress:
        f, b = bytearray(ft), bytearray(base)
        return lambda: z.compress(f, delta_second_data=b)

    def prepare_decompress(blob: bytes) -> Callable[[], bytes]:
        c, b = bytearray(blob), bytearray(base)
        return lambda: z.decompress(c, delta_second_data=b)

    return measure("zipnn", ft, repeat, prepare_compress, prepare_decompress)


def run_z4ai(base: bytes, ft: bytes, threads: int, repeat: int) -> dict:
    from z4ai import model_delta

    def prepare_compress() -> Compress:
        return lambda: model_delta.compress(ft, base, threads=threads)

    def prepare_decompress(blob: bytes) -> Callable[[], bytes]:
        return lambda: model_delta.decompress(blob, base)

    return measure("z4ai", ft, repeat, prepare_compress, prepare_decompress)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="base checkpoint (.safetensors)")
    ap.add_argument("ft", type=Path, help="fine-tuned checkpoint, same layout as base")
    ap.add_argument("--threads", type=int, default=2, help="threads passed to the peer (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--z4ai", action="store_true", help="also measure z4ai.model_delta")
    ap.add_argument("--peers", default="zipnn", help="comma-separated peers to run: zipnn, z4ai (default zipnn)")
    args = ap.parse_args()
    if args.repeat < 1 or args.threads < 1:
        ap.error("--repeat and --threads must be >= 1")
    names = [p for p in args.peers.split(",") if p]
    if args.z4ai and "z4ai" not in names:
        names.append("z4ai")
    runners = {"zipnn": run_zipnn, "z4ai": run_z4ai}
    if not names or any(p not in runners for p in names):
        ap.error(f"--peers: expected a comma-separated list of {', '.join(runners)}")

    base = args.base.read_bytes()
    ft = args.ft.read_bytes()
    if len(base) != len(ft):
        sys.exit(f"files differ in length ({len(base)} vs {len(ft)}); zipnn's byte delta needs the same layout")

    peers = {p: runners[p](base, ft, args.threads, args.repeat) for p in names}

    report = {
        "base": str(args.base),
        "ft": str(args.ft),
        "ft_bytes": len(ft),
        "threads": args.threads,
        "repeat": args.repeat,
        "peers": peers,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"ft {args.ft} ({len(ft)} B), threads={args.threads}, repeat={args.repeat}")
    print(f"{'peer':<8}{'compressed B':>14}{'ratio':>9}{'compress s':>12}{'decompress s':>14}")
    for name, r in peers.items():
        print(
            f"{name:<8}{r['compressed_bytes']:>14}{r['ratio']:>9.3f}{r['compress_s']:>12.3f}{r['decompress_s']:>14.3f}"
        )


if __name__ == "__main__":
    main()
