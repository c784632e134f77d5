"""Run the validation population (independent correct deployments) through ``harness.check`` and
record what the calibrated policy judges, tap by tap, for recalibration and false-alarm reporting.

Every (member, model, seed, mode) check writes one JSON line per (phase, tap) to ``--out``: the
policy's statistics (R, r_tail, r_bias from ``CalibratedPolicy.statistics``), the metrics behind them
(bias_t, baseline_bias_t, ulp_bias, rel_fro, baseline_rel_fro, ulp_p99, baseline_ulp_p99), the tap's
verdict and the check's, and for failing taps the worst row's lean in ULPs (``row_lean_ulp``, the
baseline's ``baseline_row_lean_ulp``): the size of what r_bias found significant. A check that cannot run writes one line with ``error``. Then it prints the
false-alarm table per member x mode: every failing check is a false alarm (the members are correct),
split by what failed first: r_bias alone with a row lean under 0.1 ULP, r_bias alone with a larger lean,
or R / r_tail, or per-kind statistics of isolated mode alone. docs/validation.md describes the members and quotes the figures.

    .venv/bin/python benchmarks/validation_sweep.py [--members all|calibration|heldout|NAME,...]
        [--models all|ID,...] [--seeds 0-1] [--modes both] [--scale tiny|full] [--decode-steps 4]
        [--imprecise] [--jobs 2] [--out reports/validation_sweep.jsonl] [--golden-dir DIR]
    .venv/bin/python benchmarks/validation_sweep.py --from-jsonl FILE... [--markdown]   # earlier runs' table

``--scale full`` runs one seed (the first) in one worker: a full-scale golden set of a 1.7B model and
its weights take several GB; the golden set is built in a child process first, so the build's peak
is returned before the checks load the weights. One job is one (model, seed), so no two workers build the same golden.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TINY_LEAN_ULP = 0.1  # a row's mean ULP error along the golden below this is a lean too small to matter
METRIC_KEYS = ("bias_t", "baseline_bias_t", "ulp_bias", "baseline_ulp_bias", "rel_fro", "baseline_rel_fro",
               "ulp_p99", "baseline_ulp_p99")


def _finite(x):
    """JSON has no NaN / Inf: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def row_lean_ulp(dut, golden) -> float:
    """The largest per-row mean of ULP errors signed along the golden (the size of the lean r_bias
    tests the significance of), ULPs measured as tap_metrics does: bf16 spacing of max(|g|, rms/16)."""
    import numpy as np

    d, g = np.asarray(dut, np.float64), np.asarray(golden, np.float64)
    rms = np.sqrt(np.mean(g * g, axis=1, keepdims=True))
    magnitude = np.maximum(np.abs(g), np.where(rms > 0, rms / 16, 1.0))
    ulp = np.exp2(np.floor(np.log2(np.maximum(magnitude, 2.0 ** -119))) - 7)
    lean = np.where(g >= 0, 1.0, -1.0) * (d - g) / ulp
    return float(np.max(np.abs(lean.mean(axis=1)))) if lean.size else 0.0


class _LeanRecorder:
    """Wraps a deployment: for every tap the judge fails, records the worst row's lean in ULPs of the
    deployment and of the baseline (nothing is kept of passing taps, so full scale stays lean)."""

    def __init__(self, deployment, leans: dict):
        self.deployment, self.leans = deployment, leans

    def _wrap(self, judge):
        def tap(name, value):
            out = judge(name, value)
            results = getattr(judge, "results", None)
            if results and results[-1].tap == name and not results[-1].passed:
                try:
                    golden = judge.golden.tensor(judge.phase, name, "fp32")
                    base = judge.golden.tensor(judge.phase, name, judge.baseline)
                except Exception:  # a judge without store access: the lean stays unknown
                    return out
                self.leans[(judge.phase, name)] = (row_lean_ulp(value, golden), row_lean_ulp(base, golden))
            return out
        return tap

    def prefill(self, input_ids, tap):
        return self.deployment.prefill(input_ids, self._wrap(tap))

    def decode(self, token_id, tap):
        return self.deployment.decode(token_id, self._wrap(tap))


def _closest_limit(judgement: dict) -> tuple[str | None, float | None]:
    """The judged statistic nearest its limit (value / limit, over 1 when it failed): a passing tap's
    headroom, whatever statistics the policy judges."""
    limits = judgement.get("thresholds") or {}
    ratios = {k: v / limits[f"{k}_max"] for k, v in (judgement.get("measured") or {}).items()
              if isinstance(v, (int, float)) and limits.get(f"{k}_max")}
    if not ratios:
        return None, None
    stat = max(ratios, key=ratios.get)
    return stat, round(ratios[stat], 4)


def _check_lines(member, model: str, seed: int, mode: str, scale: str, steps: int, golden_dir) -> list[dict]:
    import harness
    from harness.compare.policies import CalibratedPolicy
    from harness.spec import taps as tapspec

    head = {"member": member.name, "split": member.split, "model": model, "scale": scale, "seed": seed, "mode": mode}
    leans: dict = {}

    def factory(spec, weights):
        return _LeanRecorder(member.factory(spec, weights), leans)

    factory.name = member.name
    t0 = time.perf_counter()
    kwargs = {}
    if "isolation" in inspect.signature(harness.check).parameters:
        kwargs["isolation"] = "inline"  # numerics only; the lean probe needs the judge in this process
    try:
        v = harness.check(model, factory, scale=scale, seed=seed, decode_steps=steps, mode=mode,
                          golden_dir=golden_dir, **kwargs)
    except Exception as exc:  # a member that cannot run is recorded, not fatal to the sweep
        return [{**head, "error": f"{type(exc).__name__}: {exc}"}]
    elapsed = round(time.perf_counter() - t0, 3)
    policy = CalibratedPolicy()
    first = f"{v.first_failure.phase}/{v.first_failure.tap}" if v.first_failure else None
    lines = []
    for r in v.results:
        m = r.metrics or {}
        stats = policy.statistics(m, r.phase, mode) if m else {}
        reasons = (r.judgement or {}).get("reasons", [])
        worst_stat, worst_ratio = _closest_limit(r.judgement or {})
        lean, base_lean = leans.get((r.phase, r.tap), (None, None))
        lines.append({**head, "phase": r.phase, "tap": r.tap, "kind": tapspec.parse(r.tap).kind,
                      "R": stats.get("r"), "r_tail": stats.get("r_tail"), "r_bias": stats.get("r_bias"),
                      # whatever else the policy's statistics return (a recalibrated policy may add some)
                      **{f"stat_{k}": v for k, v in stats.items() if k not in ("r", "r_tail", "r_bias")},
                      **{k: m.get(k) for k in METRIC_KEYS}, "passed": r.passed,
                      "failed_on": [x.split(" ", 1)[0] for x in reasons],
                      "over": [x.split(":", 1)[0] for x in reasons],  # "r_bias 4.84 > max 4.5"
                      "worst_stat": worst_stat, "worst_ratio": worst_ratio,  # the statistic nearest its limit
                      "row_lean_ulp": lean, "baseline_row_lean_ulp": base_lean,
                      "check_passed": v.passed, "first_failure": first, "elapsed_s": elapsed})
    return [{k: _finite(x) for k, x in line.items()} for line in lines]


def _build_golden_apart(model: str, seed: int, scale: str, steps: int, golden_dir, local: bool) -> str | None:
    """Build (or reuse) the golden set and its local baseline in a child process: a full-scale build
    peaks at ~15 GB at 1.7B, which this process would keep while the checks load the weights again
    (the OOM killer took a qwen3-1.7b sweep at 19.9 GB). Returns the error of a failed build, or None."""
    import subprocess

    cmd = [sys.executable, "-m", "harness", "golden", "build", "--model", model, "--scale", scale,
           "--seed", str(seed), "--decode-steps", str(steps)]
    cmd += ["--local"] if local else []
    cmd += ["--golden-dir", str(golden_dir)] if golden_dir else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"golden build exited {done.returncode}: {lines[-1] if lines else ''}"
    return None


def _job(args: tuple) -> list[dict]:
    """Every member x mode of one (model, seed)."""
    from harness.deployment.validation import member as lookup
    from harness.threads import use_one_thread

    use_one_thread()
    model, seed, names, modes, scale, steps, golden_dir = args
    if scale == "full":
        error = _build_golden_apart(model, seed, scale, steps, golden_dir, "isolated" in modes)
        if error:
            return [{"member": n, "model": model, "scale": scale, "seed": seed, "mode": m, "error": error}
                    for n in names for m in modes]
    out = []
    for name in names:
        for mode in modes:
            out.extend(_check_lines(lookup(name), model, seed, mode, scale, steps, golden_dir))
    return out


def classify(first_line: dict) -> str:
    """Why a check failed first: 'r_bias tiny lean', 'r_bias' (with or without per-kind statistics of
    isolated mode: a row-scale error shows on both), 'per-kind' (only per-kind statistics, policies.
    KIND_LIMITS) or 'R/r_tail' (or 'error')."""
    from harness.compare.policies import STRUCTURE_REASONS

    if "error" in first_line:
        return "error"
    failed = set(first_line.get("failed_on") or [])
    if failed and failed <= set(STRUCTURE_REASONS):
        return "per-kind"
    failed -= set(STRUCTURE_REASONS)
    if failed and failed <= {"r_bias"}:
        lean = first_line.get("row_lean_ulp")
        tiny = isinstance(lean, (int, float)) and abs(lean) < TINY_LEAN_ULP
        return "r_bias tiny lean" if tiny else "r_bias"
    return "R/r_tail"


def false_alarm_table(lines: list[dict]) -> list[str]:
    """One row per member x mode: checks, failures (false alarms) by cause, the most common first tap."""
    checks: dict[tuple, dict] = {}
    for line in lines:
        key = (line["member"], line["model"], line["seed"], line["mode"])
        entry = checks.setdefault(key, {"passed": True, "first": None})
        if "error" in line:
            entry.update(passed=False, first=line)
        elif not line["check_passed"]:
            entry["passed"] = False
            if f"{line['phase']}/{line['tap']}" == line["first_failure"]:
                entry["first"] = line
    rows: dict[tuple, dict] = defaultdict(lambda: {"checks": 0, "fails": 0, "causes": defaultdict(int), "taps": defaultdict(int)})
    for (member, _model, _seed, mode), entry in checks.items():
        row = rows[(member, mode)]
        row["checks"] += 1
        if not entry["passed"]:
            row["fails"] += 1
            first = entry["first"] or {}
            row["causes"][classify(first)] += 1
            row["taps"][f"{first.get('phase', '?')} {first.get('kind', first.get('error', '?'))}"] += 1
    out = [f"{'member':26s} {'mode':10s} {'checks':>6s} {'false alarms':>12s}  {'r_bias tiny lean':>16s} "
           f"{'r_bias':>6s} {'R/r_tail':>8s} {'per-kind':>8s} {'error':>5s}  most common first failure"]
    for (member, mode), row in sorted(rows.items()):
        c = row["causes"]
        common = max(row["taps"].items(), key=lambda kv: kv[1])[0] if row["taps"] else "-"
        out.append(f"{member:26s} {mode:10s} {row['checks']:6d} {row['fails']:5d} ({row['fails'] / row['checks']:5.1%})  "
                   f"{c['r_bias tiny lean']:16d} {c['r_bias']:6d} {c['R/r_tail']:8d} {c['per-kind']:8d} {c['error']:5d}  "
                   f"{common}")
    return out


def _verdicts(lines: list[dict]) -> dict[tuple, str]:
    """(member, model, mode) -> "pass", "fail: <phase> <tap> <what exceeded>" or "error: ..." (seeds
    pooled: the first failing check of any seed)."""
    out: dict[tuple, str] = {}
    for line in lines:
        key = (line["member"], line["model"], line["mode"])
        if "error" in line:
            out[key] = f"error: {line['error'][:80]}"
        elif not line["check_passed"] and f"{line['phase']}/{line['tap']}" == line["first_failure"]:
            what = ", ".join(line.get("over") or [f"{m} {line[m]:.3g}" for m in line.get("failed_on") or []
                                                  if isinstance(line.get(m), (int, float))])
            out[key] = f"fail: {line['phase']} `{line['tap']}` {what}"
        else:
            out.setdefault(key, "pass" if line["check_passed"] else "fail")
    return out


def markdown_table(lines: list[dict]) -> list[str]:
    """One row per member, one column per model; a cell is "pass" when both modes pass, else each
    mode's verdict (the docs' full-scale table)."""
    verdicts = _verdicts(lines)
    members = list(dict.fromkeys(m for m, _, _ in verdicts))
    models = list(dict.fromkeys(m for _, m, _ in verdicts))
    out = ["| member | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for member in members:
        cells = []
        for model in models:
            modes = {mode: verdicts.get((member, model, mode), "-") for mode in ("cumulative", "isolated")}
            if all(v == "pass" for v in modes.values()):
                cells.append("pass")
            else:
                cells.append("<br>".join(f"{mode[:3]}. {v}" for mode, v in modes.items()))
        out.append(f"| {member} | " + " | ".join(cells) + " |")
    return out


def _seeds(text: str) -> list[int]:
    lo, sep, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if sep else [int(s) for s in text.split(",")]


def _members(text: str, imprecise: bool) -> list[str]:
    from harness.deployment.validation import IMPRECISE, MEMBERS

    if text == "all":
        names = list(MEMBERS)
    elif text in ("calibration", "heldout"):
        names = [n for n, m in MEMBERS.items() if m.split == text]
    else:
        names = text.split(",")
    return names + ([n for n in IMPRECISE if n not in names] if imprecise else [])


def main(argv: list[str] | None = None) -> int:
    from harness.spec.model_spec import names as model_names

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", default="all", help="all, calibration, heldout or NAME,... Default: all.")
    p.add_argument("--models", default="all", help="all or ID,... Default: all nine.")
    p.add_argument("--seeds", default="0-1", help="'a-b' or 'a,b,c'. Default: 0-1 (full scale: the first only).")
    p.add_argument("--modes", default="both", choices=["both", "cumulative", "isolated"])
    p.add_argument("--scale", default="tiny", choices=["tiny", "small", "full"])
    p.add_argument("--decode-steps", type=int, default=4, help="Decode steps. Default: 4 (as harness gate).")
    p.add_argument("--imprecise", action="store_true", help="Also run the IMPRECISE members (expected to fail).")
    p.add_argument("--jobs", type=int, default=2, help="Worker processes, at most 2. Default: 2 (full scale: 1).")
    p.add_argument("--out", default="reports/validation_sweep.jsonl", help="JSON lines output file.")
    p.add_argument("--golden-dir", default=None, help="Golden store. Default: the project's golden/.")
    p.add_argument("--from-jsonl", nargs="+", metavar="FILE", help="Print the table of earlier runs' lines; run nothing.")
    p.add_argument("--markdown", action="store_true",
                   help="With --from-jsonl: the member x model verdict table in Markdown (docs/validation.md).")
    args = p.parse_args(argv)
    if args.from_jsonl:
        lines = [json.loads(row) for name in args.from_jsonl for row in Path(name).read_text().splitlines() if row]
        for row in (markdown_table if args.markdown else false_alarm_table)(lines):
            print(row)
        return 0
    try:
        members = _members(args.members, args.imprecise)
        from harness.deployment.validation import member as lookup

        for name in members:
            lookup(name)
    except KeyError as exc:
        print(f"validation_sweep: {exc.args[0]}", file=sys.stderr)
        return 3
    models = model_names() if args.models == "all" else args.models.split(",")
    seeds = _seeds(args.seeds)
    jobs = max(1, min(args.jobs, 2))
    if args.scale == "full":
        seeds, jobs = seeds[:1], 1
    modes = ["cumulative", "isolated"] if args.modes == "both" else [args.modes]
    work = [(m, s, members, modes, args.scale, args.decode_steps, args.golden_dir) for s in seeds for m in models]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, lines = time.perf_counter(), []
    with out.open("w") as fh, ProcessPoolExecutor(jobs) as pool:
        for (model, seed, *_), result in zip(work, pool.map(_job, work)):
            for line in result:
                fh.write(json.dumps(line) + "\n")
            fh.flush()
            lines.extend(result)
            bad = {(x["member"], x["mode"]) for x in result if "error" in x or not x["check_passed"]}
            print(f"{model} seed {seed}: {len(members) * len(modes)} checks, {len(bad)} failed "
                  f"{sorted(bad)[:4]}{' ...' if len(bad) > 4 else ''}", flush=True)
    print()
    for row in false_alarm_table(lines):
        print(row)
    print(f"\n{len(lines)} tap lines -> {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
