#!/usr/bin/env python3
"""Object storage: what deltapack fetches from an S3-compatible server, and how fast.

moto's S3 server runs single-threaded on 127.0.0.1 behind the tests' counting proxy
(``crates/deltapack-py/tests/s3server.py``), which counts requests and response bytes. moto
builds the whole object for every ranged GET, so times here are moto's as much as ours:
bytes and requests are the measure, times are reported beside the local equivalent.

Measured, each a median of ``--repeat`` runs where timed:

1. ``apply`` of a delta from S3 against ``apply`` of the same file on disk: bytes fetched
   (over the delta's size), GET requests (against its chunks), time, peak RSS of the process.
2. ``store get`` of the 5th checkpoint of a 6-checkpoint training history (the base moved
   towards the fine-tune in six steps; chained as the store chooses), from an S3 store and
   from a local-directory store: bytes fetched against the chain's deltas plus the base's
   bytes (cold cache) and against the deltas alone (warm cache); time; peak RSS.
3. Two processes adding 10 checkpoints each to one S3 store at once: time, entries, every
   entry back byte-identical, ``fsck`` clean.

Needs ``moto[server]``, torch, safetensors, the installed ``deltapack`` package and
``/usr/bin/time``::

    python3 scripts/bench_remote.py --models ../shared/models --work /tmp/remote-bench \\
        --json remote.json --doc docs/BENCHMARKS.md

``--big-base DIR --big-delta FILE`` adds a row for a larger delta (peak RSS whatever the
delta's size).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "crates" / "deltapack-py" / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from s3server import MotoServer, Proxy  # noqa: E402

import deltapack  # noqa: E402

BUCKET = "bench"


def run(args: list, env: dict) -> tuple:
    """Runs the deltapack CLI; returns (seconds, peak RSS in MiB).

    The CLI is started by `/usr/bin/time`, not by this process: Linux counts the RSS a process
    had when it forked into its child's peak, and this one holds torch.
    """
    cli = shutil.which("deltapack", path=str(Path(sys.executable).parent)) or "deltapack"
    t = time.perf_counter()
    r = subprocess.run(
        ["/usr/bin/time", "-f", "%M", cli, "-q", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"deltapack {' '.join(args)} exited {r.returncode}: {r.stderr.decode()}")
    return seconds, int(r.stderr.decode().strip().splitlines()[-1]) / 1024


def timed(args_of, env: dict, repeat: int, before=None) -> dict:
    times, rss = [], []
    for i in range(repeat):
        if before:
            before()
        t, m = run(args_of(i), env)
        times.append(t)
        rss.append(m)
    return {"s": statistics.median(times), "rss_mib": max(rss)}


def same_dirs(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    return names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


def chunks_of(delta: Path) -> int:
    shown = deltapack.inspect(delta)
    cb = shown["chunk_bytes"]
    return sum(-(-t["bytes"] // cb) for t in shown["tensors"] if t["stored_bytes"] > 0)


def bench_apply(label: str, base: Path, delta: Path, proxy: Proxy, env: dict, work: Path, repeat: int) -> dict:
    url = f"s3://{BUCKET}/apply/{delta.name}"
    upload(delta, url, env)
    out = work / "out"
    clear = lambda: shutil.rmtree(out, ignore_errors=True)  # noqa: E731
    local = timed(lambda i: ["apply", "--base", str(base), str(delta), "-o", str(out)], env, repeat, clear)
    proxy.reset()
    remote = timed(lambda i: ["apply", "--base", str(base), url, "-o", str(out)], env, repeat, clear)
    counts = proxy.reset()
    size = delta.stat().st_size
    return {
        "label": label,
        "delta_bytes": size,
        "chunks": chunks_of(delta),
        "fetched_per_run": counts.bytes_out / repeat,
        "gets_per_run": counts.of("GET") / repeat,
        "local": local,
        "s3": remote,
    }


def upload(delta: Path, url: str, env: dict) -> None:
    """Copies a delta file to `url` as is, with boto3 (which moto installs): deltapack has no
    copy verb, and `make -o URL` is measured by the tests."""
    import boto3

    endpoint = env["AWS_ENDPOINT_URL"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket, key = url[len("s3://") :].split("/", 1)
    s3.upload_file(str(delta), bucket, key)


def history(base: Path, ft: Path, work: Path, steps: int = 6) -> list:
    """The base moved towards the fine-tune in `steps` steps, in the fine-tune's dtypes."""
    from safetensors.torch import load_file, save_file

    out = []
    b = load_file(str(base / "model.safetensors"))
    f = load_file(str(ft / "model.safetensors"))
    for s in range(1, steps + 1):
        d = work / "history" / f"step{s}"
        out.append(d)
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        w = s / steps
        mixed = {}
        for k, v in f.items():
            if k in b and b[k].shape == v.shape:
                mixed[k] = (b[k].float() * (1 - w) + v.float() * w).to(v.dtype).contiguous()
            else:
                mixed[k] = v
        save_file(mixed, str(d / "model.safetensors"), metadata={"format": "pt"})
        for aux in ft.iterdir():
            if aux.suffix != ".safetensors":
                shutil.copy(aux, d / aux.name)
    return out


def bench_store(base: Path, ft: Path, proxy: Proxy, env: dict, work: Path, repeat: int) -> dict:
    steps = history(base, ft, work)
    url = f"s3://{BUCKET}/history-store-{int(time.time())}"
    local_store = work / "local-store"
    shutil.rmtree(local_store, ignore_errors=True)
    run(["store", "init", url, "--base", str(base)], env)
    run(["store", "init", str(local_store), "--base", str(base)], env)
    for i, d in enumerate(steps):
        run(["store", "add", url, f"step{i + 1}", str(d)], env)
        run(["store", "add", str(local_store), f"step{i + 1}", str(d)], env)
    manifest = deltapack.Store(url).list()["manifest"]
    by_name = {e["name"]: e for e in manifest["entries"]}
    chain, cur = [], "step5"
    while cur:
        chain.append(by_name[cur])
        cur = by_name[cur]["parent"]
    chain_bytes = sum(e["delta_bytes"] for e in chain)
    base_bytes = sum(f["size"] for f in manifest["bases"][0]["files"])
    out = work / "got"
    clear = lambda: shutil.rmtree(out, ignore_errors=True)  # noqa: E731
    local = timed(lambda i: ["store", "get", str(local_store), "step5", "-o", str(out)], env, repeat, clear)
    assert same_dirs(out, steps[4])
    cold_env = dict(env, DELTAPACK_CACHE="off")
    proxy.reset()
    cold = timed(lambda i: ["store", "get", url, "step5", "-o", str(out)], cold_env, repeat, clear)
    cold_counts = proxy.reset()
    assert same_dirs(out, steps[4])
    run(["store", "get", url, "step5", "-o", str(out), "--force"], env)  # fills the cache
    proxy.reset()
    warm = timed(lambda i: ["store", "get", url, "step5", "-o", str(out)], env, repeat, clear)
    warm_counts = proxy.reset()
    return {
        "chain": [e["name"] for e in reversed(chain)],
        "chain_delta_bytes": chain_bytes,
        "base_bytes": base_bytes,
        "local": local,
        "s3_cold": cold,
        "s3_cold_fetched": cold_counts.bytes_out / repeat,
        "s3_warm": warm,
        "s3_warm_fetched": warm_counts.bytes_out / repeat,
        "s3_warm_gets": warm_counts.of("GET") / repeat,
    }


def bench_writers(env: dict, work: Path) -> dict:
    from test_remote import check_entries, tiny_history, writer_script

    models = work / "tiny"
    shutil.rmtree(models, ignore_errors=True)
    base, (h0, h1) = tiny_history(models, 2, 10)
    url = f"s3://{BUCKET}/writers-{int(time.time())}"
    deltapack.Store.init(url, base)
    t = time.perf_counter()
    jobs = [
        subprocess.Popen(writer_script(url, [(f"w{w}-step{i}", d) for i, d in enumerate(h)]), env=env)
        for w, h in enumerate((h0, h1))
    ]
    codes = [j.wait() for j in jobs]
    seconds = time.perf_counter() - t
    expected = {f"w{w}-step{i}": d for w, h in enumerate((h0, h1)) for i, d in enumerate(h)}
    shutil.rmtree(work / "got", ignore_errors=True)
    check_entries(url, expected, work)
    report = deltapack.Store(url).fsck(grace=0)
    return {"exit_codes": codes, "seconds": seconds, "entries": report["entries"], "fsck": report}


def table(r: dict) -> str:
    mib = 2**20
    lines = [
        "| delta | size | chunks | fetched by `apply` from S3 | GET requests | time local / S3 | peak RSS local / S3 |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in r["apply"]:
        lines.append(
            f"| {a['label']} | {a['delta_bytes'] / mib:.2f} MiB | {a['chunks']} | "
            f"{a['fetched_per_run'] / mib:.2f} MiB ({a['fetched_per_run'] / a['delta_bytes']:.3f}x) | "
            f"{a['gets_per_run']:.0f} | {a['local']['s']:.2f} s / {a['s3']['s']:.2f} s | "
            f"{a['local']['rss_mib']:.0f} / {a['s3']['rss_mib']:.0f} MiB |"
        )
    s = r["store"]
    floor = s["chain_delta_bytes"] + s["base_bytes"]
    lines += [
        "",
        f"`store get` of the 5th of 6 checkpoints (chain {' -> '.join(s['chain'])}, "
        f"{s['chain_delta_bytes'] / mib:.2f} MiB of deltas, base {s['base_bytes'] / mib:.1f} MiB):",
        "",
        "| store | fetched | against deltas + base | time | peak RSS |",
        "|---|---|---|---|---|",
        f"| local directory | - | - | {s['local']['s']:.2f} s | {s['local']['rss_mib']:.0f} MiB |",
        f"| S3, cold cache (`DELTAPACK_CACHE=off`) | {s['s3_cold_fetched'] / mib:.2f} MiB | "
        f"{s['s3_cold_fetched'] / floor:.3f}x | {s['s3_cold']['s']:.2f} s | {s['s3_cold']['rss_mib']:.0f} MiB |",
        f"| S3, base cached | {s['s3_warm_fetched'] / mib:.2f} MiB | "
        f"{s['s3_warm_fetched'] / s['chain_delta_bytes']:.3f}x of the deltas | {s['s3_warm']['s']:.2f} s | "
        f"{s['s3_warm']['rss_mib']:.0f} MiB |",
        "",
    ]
    w = r["writers"]
    lines += [
        f"Two processes adding 10 checkpoints each to one S3 store at once: {w['seconds']:.1f} s, "
        f"exit codes {w['exit_codes']}, {w['entries']} entries, each back byte-identical, fsck clean "
        f"({w['fsck']['leftovers_removed']} leftovers).",
        "",
        "<sub>Generated by `python3 scripts/bench_remote.py --models ../shared/models --work WORK "
        f"--doc docs/BENCHMARKS.md` on {time.strftime('%Y-%m-%d')}; moto single-threaded on 127.0.0.1.</sub>",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="../shared/models")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--big-base", type=Path)
    ap.add_argument("--big-delta", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--doc", type=Path, help="write the tables into this markdown file between the remote markers")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    server = MotoServer().start()
    server.create_bucket(BUCKET)
    proxy = Proxy(server.port)
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=proxy.url,
        DELTAPACK_CACHE_DIR=str(args.work / "cache"),
    )
    os.environ.update(env)
    try:
        base = args.models / "minilm-base-bf16"
        deltas = []
        for ft in ("ft-a-bf16", "ft-b-bf16-sharded"):
            d = args.work / f"{ft}.dpk"
            if not d.exists():
                deltapack.make(base, args.models / ft, d)
            deltas.append((ft, base, d))
        if args.big_base and args.big_delta:
            deltas.append((args.big_delta.stem, args.big_base, args.big_delta))
        result = {
            "apply": [bench_apply(n, b, d, proxy, env, args.work, args.repeat) for n, b, d in deltas],
            "store": bench_store(base, args.models / "ft-a-bf16", proxy, env, args.work, args.repeat),
            "writers": bench_writers(env, args.work),
        }
    finally:
        proxy.close()
        server.stop()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    text = table(result)
    print(text)
    if args.doc:
        from doc_tables import replace_between

        replace_between(args.doc, "remote", text + "\n")


if __name__ == "__main__":
    main()
