"""Streaming golden build vs two plain HF forwards: time and peak resident memory, side by side.

For each model (full scale, synthetic weights, ``--prompt-len`` tokens, ``--decode-steps`` steps):

- plain: the two forwards a golden needs with every weight in memory (fp32 then bf16 model, each built
  from an in-memory weights dict, prefill + greedy decode with the KV cache, no hooks). ``fwd`` is the
  forwards alone; ``prep`` the weights' generation and the models' construction before them. With
  ``--checkpoint DIR`` the weights are a checkpoint directory instead (written once from the synthetic
  weights, bf16, as downloaded from a hub): the plain run loads it with ``from_pretrained`` at each
  dtype (``prep``), the build reads it and hashes it for the golden's key: the real use, like for like.
  ``--digest-cache kept`` times every build as a later one (the checkpoint's digest kept by an earlier
  process: harness.weights.digest_cache), the default ``first`` as the checkpoint's first build.
  ``--plain-memory SIZE`` (with ``--checkpoint``) gives the plain run the build's kind of bound: each
  model is loaded with transformers' own offloading (``device_map="auto"``, ``max_memory={"cpu": SIZE}``,
  the layers beyond it offloaded to a temporary folder: the accelerate package, in the dev extra, not
  a dependency of the harness), so its forwards run in bounded memory as the build's references do.
- build: ``GoldenStore.get`` streaming (weights generated into the build's private file, both runs layer
  by layer, every tap written with its sha256 as captured), from nothing to a complete entry.

Each measurement runs in its own child process, so ``peak`` is that process's own maximum RSS and
``cpu`` its user + system seconds (the build runs its weights generator and its tap writer on threads
beside the reference: on a free second core they cost no wall time, and ``cpu`` shows what they cost).
Printed: seconds, peak GB, and build / plain (fwd) and build / plain (everything) ratios; the target is
build <= 1.3 x the two plain forwards. Models whose plain run would not fit can be skipped
(``--skip-plain``). ``--baseline DIR`` also times the build of another checkout of the harness (for
example the commit before a change: ``git archive COMMIT | tar -x -C DIR``), interleaved with the
others in the same run, and prints the ratio; ``--repeat N`` runs every measurement N times, interleaved,
and reports the medians (the machine is shared: absolute times drift). Examples:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_build.py --model qwen2.5-0.5b --model qwen3-0.6b
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_build.py --baseline /tmp/base --repeat 3
    .venv/bin/python benchmarks/bench_build.py --model llama-3.2-1b --checkpoint /tmp/ckpts --decode-steps 32
    .venv/bin/python benchmarks/bench_build.py --model qwen3-4b --checkpoint /tmp/ckpts --decode-steps 32 \
        --plain-memory 4GiB
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def _peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _offloaded(checkpoint: str, dtype, memory: str, folder: str):
    """``checkpoint`` loaded the way transformers runs a model larger than its memory: up to ``memory``
    of its layers in RAM, the rest offloaded to ``folder`` and read back in every forward (accelerate)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa",
                                                device_map="auto", max_memory={"cpu": memory},
                                                offload_folder=folder).eval()


def plain(model: str, scale: str, tokens: int, steps: int, checkpoint: str | None = None,
          memory: str | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    import harness
    from harness.reference.hf_model import build_hf_model
    from harness.reference.prompts import prompt_ids
    from harness.weights.synthetic import synthetic_weights

    spec = harness.models.get(model, scale)
    t0 = time.perf_counter()
    weights = synthetic_weights(spec, 0) if checkpoint is None else None
    gen = time.perf_counter() - t0
    ids = prompt_ids(spec, 0, tokens)
    fwd = fwd_cpu = construct = 0.0
    chosen: list[int] | None = None
    offloaded = 0
    for dtype in (torch.float32, torch.bfloat16):
        t0 = time.perf_counter()
        folder = tempfile.mkdtemp(prefix="bench-offload-") if memory else None
        if checkpoint is None:
            m = build_hf_model(spec, weights, dtype)
        elif memory:  # in bounded memory: transformers' own offloading
            m = _offloaded(checkpoint, dtype, memory, folder)
            offloaded += sum(1 for where in getattr(m, "hf_device_map", {}).values() if where == "disk")
        else:  # what a plain transformers user runs: the checkpoint loaded at each dtype
            m = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa").eval()
        construct += time.perf_counter() - t0
        t0, c0 = time.perf_counter(), _cpu_s()
        with torch.inference_mode():
            cache = DynamicCache(config=m.config)
            out = m(input_ids=torch.as_tensor(ids)[None], cache=cache, use_cache=True)
            picked = []
            for step in range(steps):
                nxt = int(out.logits[0, -1].float().argmax()) if chosen is None else chosen[step]
                picked.append(nxt)
                out = m(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
        fwd += time.perf_counter() - t0
        fwd_cpu += _cpu_s() - c0
        chosen = chosen or picked
        del m, out, cache
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    return {"gen": gen, "construct": construct, "fwd": fwd, "peak_gb": _peak_gb(), "fwd_cpu": fwd_cpu,
            "offloaded": offloaded}


def build(model: str, scale: str, tokens: int, steps: int, rows: str, checkpoint: str | None = None) -> dict:
    import shutil

    import harness.reference.capture  # noqa: F401  imports (transformers) are not build time, as in plain()
    import harness.reference.streaming  # noqa: F401
    from harness.store import GoldenRequest, GoldenStore
    from harness.weights import WeightsSource

    root = tempfile.mkdtemp(prefix="bench-build-")
    try:
        t0, c0 = time.perf_counter(), _cpu_s()
        g = GoldenStore(root).get(GoldenRequest(model, scale, 0, steps, tokens, rows=rows,
                                                weights=WeightsSource(checkpoint)))
        total, cpu = time.perf_counter() - t0, _cpu_s() - c0
        size = sum(f.stat().st_size for f in g.path.iterdir()) / 1e9
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"build": total, "cpu": cpu, "disk_gb": size, "peak_gb": _peak_gb()}


def make_checkpoint(model: str, scale: str, directory: str) -> None:
    """A Hugging Face checkpoint directory of ``model``'s synthetic seed-0 weights, as a hub download looks
    (config.json and one bfloat16 model.safetensors), unless ``directory`` already holds one."""
    from pathlib import Path

    import ml_dtypes

    import harness
    from harness.weights.lazy import write_weights_file
    from harness.weights.synthetic import synthetic_plan

    spec, d = harness.models.get(model, scale), Path(directory)
    if (d / "model.safetensors").is_file() and (d / "config.json").is_file():
        return
    d.mkdir(parents=True, exist_ok=True)
    spec.hf_config().to_json_file(str(d / "config.json"))
    write_weights_file(d / "model.safetensors", synthetic_plan(spec, 0), ml_dtypes.bfloat16)
    time.sleep(1.1)  # settled: the build's digest is then computed once, as for any checkpoint not just written


def _child(args: list[str], pythonpath: str | None = None, digests: str | None = None) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if digests:
        env["NPU_HARNESS_DIGEST_CACHE"] = digests  # harness.weights.digest_cache
    if pythonpath:
        env["PYTHONPATH"] = pythonpath  # the harness package of another checkout
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    import statistics

    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="Model id (repeatable). Default: qwen2.5-0.5b.")
    ap.add_argument("--scale", default="full")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--rows", default="full", help="Golden storage of the build: full or sampled.")
    ap.add_argument("--skip-plain", action="store_true", help="Only the build (the plain run would not fit).")
    ap.add_argument("--baseline", help="Another checkout of the harness whose build is timed alongside.")
    ap.add_argument("--repeat", type=int, default=1, help="Interleaved repetitions (medians are printed).")
    ap.add_argument("--checkpoint", metavar="DIR",
                    help="Weights from a checkpoint directory, one per model (DIR/<model>; written from the "
                         "synthetic weights when absent): the plain run loads it with from_pretrained, the "
                         "build reads it (and hashes it for the golden's key).")
    ap.add_argument("--digest-cache", choices=("first", "kept"), default="first",
                    help="With --checkpoint: `first` times every build as the checkpoint's first (its sha256 "
                         "computed; the default), `kept` as a later one, its digest kept by an earlier process.")
    ap.add_argument("--plain-memory", metavar="SIZE",
                    help="With --checkpoint: the plain run in bounded memory, as transformers runs a model "
                         "larger than its RAM (device_map='auto', max_memory={'cpu': SIZE}, the rest offloaded "
                         "to disk; needs the accelerate package), e.g. 4GiB.")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, model, scale, tokens, steps, rows, ckpt, memory = args.child
        ckpt = ckpt or None
        res = plain(model, scale, int(tokens), int(steps), ckpt, memory or None) if kind == "plain" else \
            build(model, scale, int(tokens), int(steps), rows, ckpt)
        print(json.dumps(res))
        return
    if args.plain_memory:
        import importlib.util

        if not args.checkpoint:
            ap.error("--plain-memory: needs --checkpoint (transformers offloads a checkpoint it loads)")
        if args.skip_plain:
            ap.error("--plain-memory: bounds the plain run, which --skip-plain leaves out")
        if importlib.util.find_spec("accelerate") is None:
            ap.error("--plain-memory: transformers offloads through the accelerate package, which is not "
                     "installed (pip install accelerate, or the dev extra; the harness itself does not need it)")
    print(f"scale {args.scale}, {args.decode_steps} decode steps, --rows {args.rows}, "
          f"weights {'checkpoint ' + args.checkpoint if args.checkpoint else 'synthetic'}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, median of {args.repeat}"
          + (f", checkpoint digest: {args.digest_cache}" if args.checkpoint else "")
          + (f", plain run within {args.plain_memory} (transformers' offloading)" if args.plain_memory else ""))
    digests = tempfile.mkdtemp(prefix="bench-digests-")
    head = (f"{'model':<15}{'build':<9}{'tokens':>7}{'prep s':>7}{'fwd s':>7}{'fwd cpu':>8}{'plain GB':>9}"
            f"{'build s':>8}{'cpu s':>7}{'build GB':>9}{'disk GB':>8}{'build/fwd':>10}{'cpu/fwd cpu':>12}"
            f"{'build/plain':>12}")
    print(head)
    for model in args.model or ["qwen2.5-0.5b"]:
        ckpt = ""
        if args.checkpoint:
            ckpt = os.path.join(args.checkpoint, model)
            make_checkpoint(model, args.scale, ckpt)
        common = [model, args.scale, str(args.prompt_len), str(args.decode_steps), args.rows, ckpt,
                  args.plain_memory or ""]
        runs: dict[str, list[dict]] = {"plain": [], "this": [], "baseline": []}
        kept = os.path.join(digests, model + ".json")
        if ckpt and args.digest_cache == "kept":  # an earlier process hashed it (the checkpoint has settled)
            subprocess.run([sys.executable, "-c", "import sys; from harness.weights.checkpoint import "
                            "checkpoint_digest; checkpoint_digest(sys.argv[1])", ckpt], check=True,
                           env={**os.environ, "NPU_HARNESS_DIGEST_CACHE": kept})
        for i in range(args.repeat):
            # `first`: every build its own empty cache file, so none reads a digest another build kept
            cache = {which: kept if args.digest_cache == "kept" else os.path.join(digests, f"{model}-{i}-{which}.json")
                     for which in ("baseline", "this")}
            if not args.skip_plain:
                runs["plain"].append(_child(["plain", *common]))
            if args.baseline:
                runs["baseline"].append(_child(["build", *common], args.baseline, cache["baseline"]))
            runs["this"].append(_child(["build", *common], digests=cache["this"]))
        p = _median(runs["plain"]) if runs["plain"] else None
        builds = {k: _median(v) for k, v in runs.items() if k != "plain" and v}
        for which, b in builds.items():
            row = f"{model:<15}{which:<9}{args.prompt_len:>7}"
            if p:
                fwd_cpu = p["fwd_cpu"]
                everything = p["gen"] + p["construct"] + p["fwd"]
                row += (f"{p['gen'] + p['construct']:>7.1f}{p['fwd']:>7.1f}{fwd_cpu:>8.1f}{p['peak_gb']:>9.2f}{b['build']:>8.1f}"
                        f"{b['cpu']:>7.1f}{b['peak_gb']:>9.2f}{b['disk_gb']:>8.2f}{b['build'] / p['fwd']:>10.2f}"
                        f"{b['cpu'] / fwd_cpu:>12.2f}{b['build'] / everything:>12.2f}")
            else:
                row += (f"{'-':>7}{'-':>7}{'-':>8}{'-':>9}{b['build']:>8.1f}{b['cpu']:>7.1f}{b['peak_gb']:>9.2f}"
                        f"{b['disk_gb']:>8.2f}{'-':>10}{'-':>12}{'-':>12}")
            print(row)
        if p and args.plain_memory:
            print(f"{model:<15}plain run within {args.plain_memory}: {p['offloaded']:.0f} modules offloaded to disk "
                  f"(both dtypes)")
        if "baseline" in builds:
            t, o = builds["this"], builds["baseline"]
            print(f"{model:<15}this / baseline: build {t['build'] / o['build']:.2f}, cpu {t['cpu'] / o['cpu']:.2f}, "
                  f"peak {t['peak_gb'] / o['peak_gb']:.2f}")
    shutil.rmtree(digests, ignore_errors=True)


if __name__ == "__main__":
    main()
