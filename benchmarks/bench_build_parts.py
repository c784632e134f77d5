"""Where a golden build's reference time goes: one reference run at a time, adding one part of the build
at each row, from a plain transformers model to the build's own streamed, hooked and written run.

For a checkpoint directory (``benchmarks/bench_build.py --checkpoint`` writes one from the synthetic
weights) and each dtype (fp32, then bf16), every row runs in its own subprocess, prompt then decode steps:

- ``plain``: ``from_pretrained`` at that dtype, the forwards alone (no hooks): what a transformers user runs;
- ``plain+hooks``: the same model with every tap captured (``run_reference``), handed to a no-op sink;
- ``streamed``: the build's streaming model over the build's view of the checkpoint (bf16, zero-copy;
  the fp32 run widens it), run as the build runs it, taps to a no-op sink: fp32 greedy with the resident
  room a build computes, bf16 layer-first with nothing kept, fed fixed tokens (a build feeds it the
  fp32 run's: the time does not depend on which);
- ``streamed, room 0``: step by step with nothing kept (every weight read again every forward);
- ``streamed+written``: the build's run as it is, every tap written and hashed (``PhaseFiles``), every
  row or (``--rows sampled``, as a long prompt's build) the sampled ones.

Printed: wall and CPU seconds of the run (construction apart), and each row against ``plain``. Example:

    .venv/bin/python benchmarks/bench_build_parts.py --checkpoint /tmp/ckpts/qwen2.5-1.5b --model qwen2.5-1.5b
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

ROWS = ("plain", "plain+hooks", "streamed, room 0", "streamed", "streamed+written")


def run_one(checkpoint: str, model: str, scale: str, tokens: int, steps: int, rows: str, dtype_name: str,
            row: str) -> dict:
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    import harness
    from harness.reference.capture import run_reference
    from harness.reference.hf_model import ATTN_IMPL
    from harness.reference.prompts import prompt_ids
    from harness.reference.streaming import build_streaming_model
    from harness.spec import taps as tapspec
    from harness.store.bounds import build_rooms
    from harness.store.streamwrite import PhaseFiles, sampled_rows
    from harness.weights import WeightsSource, build_source

    spec = harness.models.get(model, scale)
    ids = prompt_ids(spec, 0, tokens)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    tmp = Path(tempfile.mkdtemp(prefix="bench-parts-"))
    files = None
    try:
        t0 = time.perf_counter()
        if row.startswith("plain"):
            m = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa").eval()
            m.config._attn_implementation = ATTN_IMPL  # the capture's attention (the stock SDPA, tapped)
        else:
            # The build's two rooms (the prompt's, the decode steps'), for its storage mode
            rooms = (0, 0) if row.endswith("room 0") or dtype_name == "bf16" else build_rooms(spec, tokens, steps, rows)
            m = build_streaming_model(spec, build_source(spec, WeightsSource(checkpoint), 0, tmp), dtype, *rooms)
        construct = time.perf_counter() - t0
        sink = lambda phase, name, t: None  # noqa: E731
        if row == "streamed+written":
            kept = sampled_rows(tokens, "bench-build-parts") if rows == "sampled" else None
            files = PhaseFiles(tmp, spec, tapspec.phase_names(steps), tokens, (dtype_name,), kept)
            sink = lambda phase, name, t: files.put(dtype_name, phase, name, t)  # noqa: E731
        t0, c0 = time.perf_counter(), time.process_time()
        if row == "plain":
            with torch.inference_mode():
                cache = DynamicCache(config=m.config)
                out = m(input_ids=torch.as_tensor(ids)[None], cache=cache, use_cache=True)
                for _ in range(steps):
                    nxt = int(out.logits[0, -1].float().argmax())
                    out = m(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
        elif dtype_name == "bf16" and row.startswith("streamed") and row != "streamed, room 0":
            fed = prompt_ids(spec, 1, max(steps, 1))[:steps]
            run_reference(m, spec, ids, decode_steps=steps, decode_tokens=fed, sink=sink, layer_first=True)
        else:
            run_reference(m, spec, ids, decode_steps=steps, sink=sink)
        if files is not None:
            files.close()
            files = None
        return {"construct": construct, "run": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    finally:
        if files is not None:
            files.abort()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="A checkpoint directory of --model at --scale.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--scale", default="full")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--rows", default="full", choices=("full", "sampled"), help="the written row's storage")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.checkpoint, args.model, args.scale, args.prompt_len, args.decode_steps,
                                 args.rows, *args.child)))
        return
    print(f"{args.model} ({args.scale}), checkpoint {args.checkpoint}, {args.prompt_len} tokens, "
          f"{args.decode_steps} decode steps, {args.rows} rows written")
    print(f"{'dtype':<6}{'row':<18}{'construct s':>12}{'run s':>8}{'cpu s':>8}{'run / plain':>12}")
    for dtype_name in ("fp32", "bf16"):
        plain = None
        for row in ROWS:
            out = subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--model", args.model,
                                  "--scale", args.scale, "--prompt-len", str(args.prompt_len),
                                  "--decode-steps", str(args.decode_steps), "--rows", args.rows,
                                  "--child", dtype_name, row],
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            plain = plain or r["run"]
            print(f"{dtype_name:<6}{row:<18}{r['construct']:>12.1f}{r['run']:>8.1f}{r['cpu']:>8.1f}"
                  f"{r['run'] / plain:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
