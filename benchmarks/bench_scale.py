"""Full-scale memory and time: ``harness golden build`` and ``harness gate`` per model and prompt length.

Each command runs in its own subprocess; the peak resident memory is that of the whole process tree
(the gate's deployment child included): the sum of the tree's proportional set sizes (PSS, from
/proc/PID/smaps_rollup, polled every 0.2 s), so the shared-memory segment a large tap crosses in is counted
once, not once per process mapping it (the RSS sum used before counted it twice). The PSS, a page-table walk,
is read only when the tree's RSS sum (cheap, never below it) could beat the peak: the poller stays off the
cores it measures. ``plain`` is the time of two plain
HF forwards (fp32 and bf16: the prompt plus the decode steps with the KV cache, models built outside the
timing) in a third subprocess, the reference point of the build's "within 1.3x" target (``x plain``);
``x plain run`` divides by that subprocess's whole wall time instead (start-up, the synthetic weights, both
models and the forwards: what a build also has to do). Both are skipped (``-``) when the fp32 model would
not fit next to the bf16 one (``--plain-max-gb``). ``gate own`` is the share of the gate's wall time
spent outside the deployment's calls (from its ``--json``: its own phases 0-1, reading the golden,
judging that did not overlap the deployment), the overhead the "does not grow" target is about.

Run (big runs hold the shared memory lock, bounded in time)::

    flock /tmp/npu-harness-bigmem.lock timeout 7200 .venv/bin/python benchmarks/bench_scale.py \\
        --models qwen3-0.6b --prompt-lens 128 --decode-steps 32

Prints one table row per (model, prompt length) as it completes, and the table again at the end;
``--json PATH`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b", "qwen2.5-1.5b", "qwen3-1.7b", "smollm2-1.7b",
          "llama-3.2-3b", "qwen2.5-3b", "qwen3-4b")
HEADER = ("model", "tokens", "build GB", "build s", "x plain", "x plain run", "gate GB", "gate s", "gate own",
          "gate exit")
RATIO_AND_GATE = ("ratio", "ratio_run", "gate_gb", "gate_s", "gate_own", "gate_exit")  # the row's keys after "build s"


def _children_scan() -> dict[int, list[int]]:
    """Every process's children, from a scan of /proc (the fallback: a few ms per call on a busy machine)."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _children_of(pid: int) -> list[int] | None:
    """``pid``'s children from /proc/PID/task/*/children (each thread lists the children it started), or
    None when the kernel does not provide those files. Reading them is about 100x cheaper than scanning
    /proc: polled five times a second, the scan took 15% of a core from the run it measured."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []  # the process has gone
    kids: list[int] = []
    for tid in tasks:
        try:
            kids += [int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except FileNotFoundError:
            if not Path(f"/proc/{pid}/task/{tid}").exists():
                continue  # the thread ended between the listing and the read
            return None  # no children files in this kernel
        except OSError:
            continue
    return kids


def _pss_bytes(pid: int) -> int:
    """Proportional set size: private pages plus each shared page divided among the processes mapping it."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _rss_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/statm: cheap (no page-table walk), and never below the PSS."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    tree: dict[int, list[int]] | None = None
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        kids = _children_of(pid) if tree is None else None
        if kids is None:
            tree = tree or _children_scan()
            kids = tree.get(pid, [])
        todo.extend(kids)
    return out


def peak_step(root: int, peak: int) -> int:
    """The tree's PSS peak after one more poll. PSS never exceeds RSS, so the PSS is read (a page-table
    walk: 60 ms for a 4 GB process, 40% of a core when polled five times a second) only when the RSS sum
    could beat the peak; the result is the same peak."""
    pids = process_tree(root)
    if sum(_rss_bytes(p) for p in pids) <= peak:
        return peak
    return max(peak, sum(_pss_bytes(p) for p in pids))


def run_measured(cmd: list[str], timeout: float, log: Path | None = None) -> dict:
    """Run ``cmd``; its wall time, exit code and the process tree's peak resident memory."""
    start = time.perf_counter()
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
        peak = 0
        while proc.poll() is None:
            peak = peak_step(proc.pid, peak)
            if time.perf_counter() - start > timeout:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
    finally:
        if log:
            out.close()
    return {"seconds": round(time.perf_counter() - start, 1), "peak_gb": round(peak / 1e9, 2),
            "exit": proc.returncode}


PLAIN = """
import sys, time, torch
from harness.spec.model_spec import get
from harness.reference.hf_model import build_hf_model
from harness.reference.prompts import prompt_ids
from harness.weights import WeightsSource, load_weights
model, tokens, steps, scale = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
spec = get(model, scale)
weights = load_weights(spec, WeightsSource(None), 0)
ids = torch.as_tensor(prompt_ids(spec, 0, tokens))[None, :]
total = 0.0
for dtype in (torch.float32, torch.bfloat16):
    hf = build_hf_model(spec, weights, dtype)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf(input_ids=ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            out = hf(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        total += time.perf_counter() - t0
    del hf, out, cache
print(total)
"""


def plain_seconds(model: str, tokens: int, steps: int, timeout: float,
                  scale: str = "full") -> tuple[float, float] | None:
    """(seconds of the two plain HF forwards (fp32 + bf16), wall seconds of the whole plain run), or None
    when they did not run."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", PLAIN, model, str(tokens), str(steps), scale], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return float(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def gate_own_share(doc: Path) -> float | None:
    """The share of the gate's time not spent inside the deployment's calls (its own work: phases 0-1,
    reading goldens, judging what did not overlap the deployment), from its ``--json`` document."""
    try:
        gates = json.loads(doc.read_text())["models"]
        elapsed = sum(g["elapsed_s"] for g in gates)
        return round((elapsed - sum(g["deployment_s"] for g in gates)) / elapsed, 3) if elapsed > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        doc.unlink(missing_ok=True)


def params(spec) -> int:
    """Parameter count of ``spec`` (tied embeddings counted once)."""
    attn = spec.hidden_size * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim \
        + spec.num_heads * spec.head_dim * spec.hidden_size
    embed = spec.vocab_size * spec.hidden_size * (1 if spec.tied_embeddings else 2)
    return spec.num_layers * (attn + 3 * spec.hidden_size * spec.intermediate_size) + embed


def harness_cmd() -> list[str]:
    return [sys.executable, "-m", "harness"]


def bench_one(model: str, tokens: int, args, golden_dir: Path) -> dict:
    from harness.spec.model_spec import get

    common = ["--model", model, "--scale", args.scale, "--prompt-len", str(tokens),
              "--decode-steps", str(args.decode_steps), "--golden-dir", str(golden_dir)]
    rows = ["--rows", args.rows] if args.rows != "full" else []
    log = Path(args.log) if args.log else None
    build = run_measured(harness_cmd() + ["golden", "build", *common, *rows], args.timeout, log)
    gate = {"seconds": None, "peak_gb": None, "exit": None}
    own = None
    if build["exit"] == 0:
        doc = golden_dir / f".bench-gate-{model}-{tokens}.json"
        gate_cmd = harness_cmd() + ["gate", *common, *rows, "--phase", str(args.phase), "--json", str(doc)]
        if args.rows != "full":
            gate_cmd += ["--mode", "cumulative"]
        gate = run_measured(gate_cmd, args.timeout, log)
        own = gate_own_share(doc)
    fp32_gb = params(get(model, args.scale)) * 4 / 1e9
    plain = None
    if not args.no_plain and fp32_gb * 1.5 <= args.plain_max_gb:
        plain = plain_seconds(model, tokens, args.decode_steps, args.timeout, args.scale)
    comparable = plain is not None and build["exit"] == 0  # both ratios need a build and a plain run
    return {"model": model, "tokens": tokens, "build_gb": build["peak_gb"], "build_s": build["seconds"],
            "build_exit": build["exit"], "plain_s": None if plain is None else round(plain[0], 1),
            "ratio": round(build["seconds"] / plain[0], 2) if comparable else None,
            "plain_run_s": None if plain is None else round(plain[1], 1),
            "ratio_run": round(build["seconds"] / plain[1], 2) if comparable else None,
            "gate_gb": gate["peak_gb"], "gate_s": gate["seconds"], "gate_exit": gate["exit"], "gate_own": own,
            "decode_steps": args.decode_steps, "rows": args.rows, "phase": args.phase}


def _cell(value) -> str:
    return "-" if value is None else str(value)


def table(rows: list[dict]) -> str:
    lines = [" | ".join(HEADER), " | ".join("---" for _ in HEADER)]
    for r in rows:
        build_s = _cell(r["build_s"]) + ("" if r["build_exit"] == 0 else f" (exit {r['build_exit']})")
        lines.append(" | ".join(_cell(v) for v in (r["model"], r["tokens"], r["build_gb"])) + f" | {build_s} | " +
                     " | ".join(_cell(r.get(k)) for k in RATIO_AND_GATE))
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model ids. Default: all nine")
    p.add_argument("--prompt-lens", default="128,2048", help="comma-separated prompt lengths. Default: 128,2048")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps. Default: 32")
    p.add_argument("--rows", default="full", choices=("full", "sampled"), help="golden storage. Default: full")
    p.add_argument("--scale", default="full", help="model scale. Default: full")
    p.add_argument("--phase", type=int, default=5, help="gate phases 0..N. Default: 5")
    p.add_argument("--golden-dir", default=None, help="golden store (default: a temporary directory, removed)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per command. Default: 7200")
    p.add_argument("--plain-max-gb", type=float, default=12.0,
                   help="skip the plain forwards when 1.5x the fp32 weights exceed this. Default: 12")
    p.add_argument("--no-plain", action="store_true", help="skip the plain HF forwards")
    p.add_argument("--log", default=None, help="append the commands' output to this file. Default: discarded")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    lens = [int(x) for x in args.prompt_lens.split(",") if x.strip()]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        golden_dir = Path(args.golden_dir or tmp)
        for model in models:
            for tokens in lens:
                row = bench_one(model, tokens, args, golden_dir)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
