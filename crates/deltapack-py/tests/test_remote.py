"""Deltas on object storage: a real S3-compatible server (moto) on 127.0.0.1, behind a proxy
that counts what deltapack fetches and injects faults."""

from __future__ import annotations

import filecmp
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import deltapack

pytest.importorskip("moto", reason="moto[server] is the S3 server these tests run against")

# The server helpers sit beside this file; pytest's importlib mode does not put it on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import Fault, MotoServer, Proxy  # noqa: E402

BUCKET = "deltas"


@pytest.fixture(scope="module")
def s3():
    server = MotoServer().start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture
def proxy(s3, monkeypatch):
    p = Proxy(s3.port)
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": p.url,
        "DELTAPACK_S3_RETRIES": "3",
        "DELTAPACK_S3_RETRY_TIMEOUT": "20",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield p
    p.close()


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The `deltapack` CLI of the installed package, with this process's environment."""
    r = subprocess.run(
        [sys.executable, "-m", "deltapack", "-q", *args], capture_output=True, text=True, env=dict(os.environ)
    )
    if check and r.returncode != 0:
        raise AssertionError(f"deltapack {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def same_dirs(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    other = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    return names == other and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def index_len(delta: Path) -> int:
    """Bytes of a delta's compressed index, from its trailer (see docs/FORMAT.md)."""
    trailer = delta.read_bytes()[-64:]
    return struct.unpack_from("<Q", trailer, 8)[0]


def test_apply_from_s3_fetches_the_delta_once(proxy, base, ft_a, delta_a, tmp_path):
    url = f"s3://{BUCKET}/apply/ft-a.dpk"
    cli("make", "--base", str(base), "--finetuned", str(ft_a), "-o", url)
    proxy.reset()
    cli("apply", "--base", str(base), url, "-o", str(tmp_path / "out"))
    counts = proxy.reset()
    size = delta_a.stat().st_size
    chunks = sum(1 for t in deltapack.inspect(delta_a)["tensors"] if t["stored_bytes"] > 0)
    assert same_dirs(tmp_path / "out", ft_a)
    assert counts.bytes_out <= 1.05 * size, (counts.bytes_out, size)
    # Trailer, header and index, then the payload: coalesced, so far fewer requests than
    # chunks.
    assert counts.of("GET") <= 3 + chunks, counts.requests
    assert counts.of("GET") < chunks / 2, counts.requests
    # verify and inspect read the same way; inspect reads the index alone.
    cli("verify", "--base", str(base), url, "--finetuned", str(ft_a))
    proxy.reset()
    shown = cli("inspect", "--json", url).stdout
    assert '"ratio"' in shown
    counts = proxy.reset()
    assert counts.of("GET") == 3 and counts.bytes_out <= index_len(delta_a) + 64 + 16


def test_one_tensor_fetches_the_index_and_its_chunks(proxy, base, delta_a):
    url = f"s3://{BUCKET}/random/ft-a.dpk"
    proxy.reset()
    cli("make", "--base", str(base), "--finetuned", str(base.parent / "ft-a-bf16"), "-o", url)
    shown = deltapack.inspect(delta_a)
    name, stored, size = max(((t["name"], t["stored_bytes"], t["bytes"]) for t in shown["tensors"]), key=lambda x: x[1])
    chunks = -(-size // shown["chunk_bytes"])
    proxy.reset()
    with deltapack.safe_open(base, url, framework="numpy") as f:
        remote = f.get_tensor(name)
    counts = proxy.reset()
    with deltapack.safe_open(base, delta_a, framework="numpy") as f:
        local = f.get_tensor(name)
    assert (remote == local).all()
    assert counts.bytes_out <= index_len(delta_a) + 64 + 16 + stored, (counts.bytes_out, stored)
    # Trailer, header and index, then at most one request per chunk of the tensor.
    assert counts.of("GET") <= 3 + chunks, counts.requests


def test_python_load_and_make_take_urls(proxy, base, ft_b, delta_b):
    url = f"s3://{BUCKET}/py/ft-b.dpk"
    deltapack.make(base, ft_b, url)
    remote = deltapack.load(base, url, framework="numpy")
    local = deltapack.load(base, delta_b, framework="numpy")
    assert remote.keys() == local.keys()
    assert all((remote[k] == local[k]).all() for k in local)


def test_multipart_upload_is_invisible_until_complete(s3, proxy, base, ft_b, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAPACK_S3_PART_MIB", "5")
    url = f"s3://{BUCKET}/multipart/ft-b.dpk"
    # The second part fails for good: the upload is aborted and nothing appears.
    proxy.faults.append(Fault(lambda m, p: m == "PUT" and "partNumber=2" in p, 400, b"", times=100))
    r = cli("make", "--base", str(base), "--finetuned", str(ft_b), "-o", url, check=False)
    assert r.returncode == 5, r.stderr
    assert url in r.stderr
    assert s3.request("HEAD", "/deltas/multipart/ft-b.dpk")[0] == 404
    status, _, listing = s3.request("GET", "/deltas?uploads")
    assert status == 200 and b"<UploadId>" not in listing, listing
    proxy.reset()
    cli("make", "--base", str(base), "--finetuned", str(ft_b), "-o", url)
    counts = proxy.reset()
    assert counts.of("PUT") >= 2 and counts.of("POST") >= 2, counts.requests  # parts, start, complete
    cli("apply", "--base", str(base), url, "-o", str(tmp_path / "out"))
    assert same_dirs(tmp_path / "out", ft_b)
    # Never overwritten without --force; with it, replaced.
    r = cli("make", "--base", str(base), "--finetuned", str(ft_b), "-o", url, check=False)
    assert r.returncode == 2 and "already exists" in r.stderr
    cli("make", "--base", str(base), "--finetuned", str(ft_b), "-o", url, "--force")


def test_throttling_and_server_errors_are_retried(proxy, base, ft_a, tmp_path):
    url = f"s3://{BUCKET}/faults/ft-a.dpk"
    cli("make", "--base", str(base), "--finetuned", str(ft_a), "-o", url)
    slow_down = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    proxy.faults += [
        Fault(lambda m, p: m == "GET", 503, slow_down, times=2),
        Fault(lambda m, p: m == "GET", 500, b"<Error><Code>InternalError</Code></Error>", times=1),
    ]
    cli("apply", "--base", str(base), url, "-o", str(tmp_path / "out"))
    assert same_dirs(tmp_path / "out", ft_a)


def test_a_server_that_stays_down_is_a_clear_error(proxy, base, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAPACK_S3_RETRIES", "2")
    monkeypatch.setenv("DELTAPACK_S3_RETRY_TIMEOUT", "2")
    url = f"s3://{BUCKET}/faults/ft-a.dpk"
    proxy.faults.append(Fault(lambda m, p: True, 503, b"<Error><Code>ServiceUnavailable</Code></Error>", times=10**6))
    r = cli("apply", "--base", str(base), url, "-o", str(tmp_path / "out"), check=False)
    assert r.returncode == 5, r.stderr
    assert url in r.stderr and not (tmp_path / "out").exists()
    # Nothing listening at all: the same exit code, naming the URL.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    r = cli("inspect", url, check=False)
    assert r.returncode == 5 and url in r.stderr, r.stderr


def test_refused_credentials_say_what_was_tried(proxy, base, tmp_path):
    denied = b"<Error><Code>InvalidAccessKeyId</Code><Message>No such key.</Message></Error>"
    proxy.faults.append(Fault(lambda m, p: True, 403, denied, times=10**6))
    r = cli("inspect", f"s3://{BUCKET}/faults/ft-a.dpk", check=False)
    assert r.returncode == 5, r.stderr
    assert "AWS_ACCESS_KEY_ID" in r.stderr and "AWS_ENDPOINT_URL" in r.stderr, r.stderr


def test_file_urls_read_and_write_like_objects(base, ft_a, tmp_path):
    url = f"file://{tmp_path}/by-url/ft-a.dpk"
    cli("make", "--base", str(base), "--finetuned", str(ft_a), "-o", url)
    assert (tmp_path / "by-url" / "ft-a.dpk").is_file()
    cli("apply", "--base", str(base), url, "-o", str(tmp_path / "out"))
    assert same_dirs(tmp_path / "out", ft_a)
    r = cli("inspect", "gs://bucket/x.dpk", check=False)
    assert r.returncode == 2 and "s3://" in r.stderr


# -- A store shared by many writers -------------------------------------------------------


def tiny_history(root: Path, writers: int, steps: int) -> tuple:
    """A small f32 base and, per writer, a training history of `steps` checkpoints (each one
    a few updates away from the one before), as model directories."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {f"layer{i}.weight": rng.standard_normal((64, 256)).astype(np.float32) for i in range(8)}
    config = json.dumps({"model_type": "tiny", "hidden_size": 256})

    def write(d: Path, ts: dict) -> Path:
        d.mkdir(parents=True)
        save_file(ts, str(d / "model.safetensors"))
        (d / "config.json").write_text(config)
        return d

    base = write(root / "base", tensors)
    histories = []
    for w in range(writers):
        cur = {k: v.copy() for k, v in tensors.items()}
        hist = []
        for s in range(steps):
            for k in cur:
                idx = rng.integers(0, cur[k].size, 500)
                cur[k].flat[idx] += rng.standard_normal(500).astype(np.float32) * 1e-3
            hist.append(write(root / f"w{w}-step{s}", cur))
        histories.append(hist)
    return base, histories


def writer_script(store: str, names_and_dirs: list) -> list:
    code = (
        "import sys, deltapack\n"
        "s = deltapack.Store(sys.argv[1])\n"
        "for i in range(2, len(sys.argv), 2):\n"
        "    s.add(sys.argv[i], sys.argv[i + 1])\n"
    )
    args = [sys.executable, "-c", code, store]
    for name, d in names_and_dirs:
        args += [name, str(d)]
    return args


def check_entries(store_url: str, expected: dict, tmp_path: Path) -> None:
    s = deltapack.Store(store_url)
    names = set(s.names())
    assert set(expected) <= names, sorted(set(expected) - names)
    for name in names:
        out = tmp_path / "got" / name
        s.get(name, out)
        assert same_dirs(out, expected[name]), name


def test_two_writers_share_one_store(s3, proxy, tmp_path):
    base, (h0, h1) = tiny_history(tmp_path / "models", 2, 10)
    url = f"s3://{BUCKET}/shared-store"
    deltapack.Store.init(url, base)
    jobs = [
        subprocess.Popen(writer_script(url, [(f"w{w}-step{i}", d) for i, d in enumerate(h)]), env=dict(os.environ))
        for w, h in enumerate((h0, h1))
    ]
    assert [j.wait(timeout=600) for j in jobs] == [0, 0]
    expected = {f"w{w}-step{i}": d for w, h in enumerate((h0, h1)) for i, d in enumerate(h)}
    check_entries(url, expected, tmp_path)
    assert len(deltapack.Store(url).names()) == 20
    report = deltapack.Store(url).fsck()
    assert report["entries"] == 20
    # A writer that lost races re-read the manifest and committed on top: the entries chain.
    parents = [e["parent"] for e in deltapack.Store(url).list()["manifest"]["entries"]]
    assert sum(p is not None for p in parents) >= 10, parents


def test_a_writer_killed_anywhere_loses_nothing(s3, proxy, tmp_path):
    import random
    import signal
    import time

    base, (steady, killed) = tiny_history(tmp_path / "models", 2, 6)
    url = f"s3://{BUCKET}/killed-store"
    deltapack.Store.init(url, base)
    keeper = subprocess.Popen(writer_script(url, [(f"a{i}", d) for i, d in enumerate(steady)]), env=dict(os.environ))
    rnd = random.Random(7)
    for i, d in enumerate(killed):
        victim = subprocess.Popen(writer_script(url, [(f"k{i}", d)]), env=dict(os.environ))
        time.sleep(rnd.uniform(0.05, 1.5))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert keeper.wait(timeout=600) == 0
    expected = {f"a{i}": d for i, d in enumerate(steady)}
    expected.update({f"k{i}": d for i, d in enumerate(killed)})
    s = deltapack.Store(url)
    listed = set(s.names())
    # Nothing lost: every steady entry; nothing half-visible: every listed entry rebuilds.
    assert {f"a{i}" for i in range(len(steady))} <= listed
    check_entries(url, {n: expected[n] for n in listed}, tmp_path)
    status, _, listing = s3.request("GET", f"/{BUCKET}?list-type=2&prefix=killed-store/deltas/")
    stored = listing.count(b"<Key>")
    assert stored >= len(listed)
    report = s.fsck(grace=0)
    assert report["leftovers_removed"] == stored - len(listed)


def test_fsck_aborts_the_upload_of_a_killed_writer(s3, proxy, base, ft_b, monkeypatch):
    import time

    monkeypatch.setenv("DELTAPACK_S3_PART_MIB", "5")
    url = f"s3://{BUCKET}/abandoned-store"
    s = deltapack.Store.init(url, base)
    # The second part hangs: the writer is killed with the upload started, its marker there.
    proxy.faults.append(Fault(lambda m, p: m == "PUT" and "partNumber=2" in p, None, delay=60))
    writer = subprocess.Popen(writer_script(url, [("ft-b", ft_b)]), env=dict(os.environ))
    deadline = time.monotonic() + 120
    while b".deltapack-upload-" not in s3.request("GET", f"/{BUCKET}?list-type=2&prefix=abandoned-store/")[2]:
        assert time.monotonic() < deadline and writer.poll() is None, "no upload started"
        time.sleep(0.1)
    time.sleep(1)
    writer.kill()
    writer.wait()
    assert b"<UploadId>" in s3.request("GET", f"/{BUCKET}?uploads")[2]
    assert s.names() == []
    report = s.fsck(grace=0)
    assert report["leftovers_removed"] >= 1
    assert b"<UploadId>" not in s3.request("GET", f"/{BUCKET}?uploads")[2]
    listing = s3.request("GET", f"/{BUCKET}?list-type=2&prefix=abandoned-store/")[2]
    assert b".deltapack-upload-" not in listing and b"/deltas/" not in listing


def test_an_add_outlives_a_server_restart(s3, proxy, base, ft_a, ft_b, tmp_path, monkeypatch):
    monkeypatch.delenv("DELTAPACK_S3_RETRIES")  # the default: 30, backoff growing to 10 s
    url = f"s3://{BUCKET}/restart-store"
    s = deltapack.Store.init(url, base)
    s.add("a", ft_a)
    # The server goes away for 3 s in the middle of the next add (its requests retried with
    # backoff), then answers again.
    proxy.reset()
    proxy.outage_after(20, 3.0)
    r = cli("store", "add", url, "b", str(ft_b))
    assert r.returncode == 0
    s.get("b", tmp_path / "b")
    assert same_dirs(tmp_path / "b", ft_b)
    assert s.names() == ["a", "b"]


def test_a_base_at_a_url_is_read_by_ranges_or_from_the_cache(s3, proxy, base, ft_a, delta_a, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAPACK_CACHE_DIR", str(tmp_path / "cache"))
    for f in base.iterdir():
        status, _, body = s3.request("PUT", f"/{BUCKET}/bases/minilm/{f.name}", f.read_bytes())
        assert status == 200, body
    small = sum(f.stat().st_size for f in base.iterdir() if f.suffix != ".safetensors")
    weights = base / "model.safetensors"
    header = 8 + struct.unpack("<Q", weights.read_bytes()[:8])[0]
    url = f"s3://{BUCKET}/bases/minilm"
    # One tensor: the listing, the small files, the shard's header and that tensor's bytes.
    name = "embeddings.word_embeddings.weight"
    proxy.reset()
    with deltapack.safe_open(url, delta_a, framework="numpy") as f:
        remote = f.get_tensor(name)
    one = proxy.reset()
    with deltapack.safe_open(base, delta_a, framework="numpy") as f:
        assert (remote == f.get_tensor(name)).all()
    with deltapack.safe_open(base, delta_a, framework="numpy") as f:
        tensor_bytes = f.get_tensor(name).nbytes
    assert one.bytes_out <= small + header + tensor_bytes + (64 << 10), (one.bytes_out, tensor_bytes)
    # A whole apply reads the whole base, by ranges, once.
    base_bytes = small + weights.stat().st_size
    cli("apply", "--base", url, str(delta_a), "-o", str(tmp_path / "first"))
    first = proxy.reset()
    assert same_dirs(tmp_path / "first", ft_a)
    assert base_bytes <= first.bytes_out <= 1.01 * base_bytes + (64 << 10), (first.bytes_out, base_bytes)
    # A command that reads the base whole (make) leaves it in the cache; then only the
    # listing that says it is unchanged is fetched.
    cli("make", "--base", url, "--finetuned", str(ft_a), "-o", str(tmp_path / "again.dpk"))
    proxy.reset()
    cli("apply", "--base", url, str(delta_a), "-o", str(tmp_path / "second"))
    second = proxy.reset()
    assert same_dirs(tmp_path / "second", ft_a)
    assert second.of("GET") == 1 and second.bytes_out < 64 << 10, second.requests


def test_init_refuses_a_server_that_ignores_conditional_writes(proxy, base):
    proxy.strip_conditions = True
    url = f"s3://{BUCKET}/unconditional-store"
    r = cli("store", "init", url, "--base", str(base), check=False)
    assert r.returncode == 2, r.stderr
    assert "conditional writes" in r.stderr, r.stderr
    proxy.strip_conditions = False
    r = cli("store", "list", url, check=False)
    assert r.returncode == 2 and "not a deltapack store" in r.stderr, r.stderr
