"""Minimum detectable error of the gate for the generic bug shapes (harness/selftest/bug_shapes.py).

The engine is harness/selftest/shape_sweep.py (importable, e.g. by the self-test); this script runs it
over models, seeds and hosts in at most two processes and writes the tables.

For each (model, seed) the host deployment runs once per mode through ``harness.check`` while a thin
wrapper records the values it hands over (in isolated mode the host sees golden inputs). Then every
tap x shape x magnitude is judged directly: the shape applied to the host's own value, judged by
``harness.checker.judge_tap`` against the fp32 golden and the mode's baseline (isolated: the local bf16
baseline; cumulative: the bf16 run), under the policy the gate uses. Isolated mode gives downstream ops
goldens, so only the perturbed tap can fail: "detected at exactly the perturbed tap" is the perturbed
value failing where the host's own value passes (taps where the host itself fails are left out and
counted). In cumulative mode the judged tap carries the host's upstream error too.

Reports, per shape x magnitude x tap kind x phase kind (prefill / decode) x mode, the detection rate,
and per tap kind the minimum detectable magnitude: the smallest on the shape's grid from which every
magnitude is detected on >= 99% of taps. For the misses at each shape's reference magnitude (1%, or
its gross form) it names the statistic nearest its limit, and scores a candidate statistic
(per row, per head-sized block, in ULPs, and the mean lean; see CANDIDATES) on the misses and on
the host's clean taps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bug_shape_sweep.py [--models all] [--seeds 0-3]
        [--host emulator] [--host replay-fp32] [--host MOD:FACTORY] [--modes isolated,cumulative]
        [--shapes all] [--decode-steps 2] [--policy TEXT ...] [--jobs 2] [--out reports/bug_shapes]

Writes OUT/bug_shapes.json (every count) and OUT/bug_shapes.md (the tables docs/bug-shapes.md quotes);
prints the Markdown. Exit 0 when every shape's reference magnitude is detected on >= 99.5% of isolated
taps in prefill and in decode on every host, else 1; 3 when it could not run.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from harness.selftest.shape_sweep import (CANDIDATES, MDE_RATE, MISS_SAMPLES, TARGET, count_where, merge,
                                          phase_kind, sweep_job, target_met)


def _rate(n: int, d: int) -> str:
    return "-" if n == 0 else f"{100.0 * d / n:.1f}%"


def _mag(m: float) -> str:
    return f"{100 * m:g}%" if m < 1 else f"{m:g}"


def reference_table(counts: dict, shapes: list[str], modes: list[str]) -> list[str]:
    from harness.selftest import bug_shapes

    cols = [(mode, pk) for mode in modes for pk in ("prefill", "decode")]
    lines = ["| shape | magnitude | " + " | ".join(f"{mode} {pk}" for mode, pk in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name in shapes:
        s = bug_shapes.get(name)
        mags = sorted({s.reference, *(m for m in (0.005, 0.01, 0.02) if m in s.magnitudes)})
        for m in mags:
            cells = []
            for mode, pk in cols:
                n, d = count_where(counts, lambda k, mode=mode, pk=pk, m=m: k[0] == mode and k[1] == name
                            and float(k[2]) == m and k[4] == pk)
                flag = " **" if n and d / n < TARGET and mode == "isolated" and m == s.reference else ""
                cells.append(f"{_rate(n, d)}{flag.strip() and ' (miss ' + str(n - d) + '/' + str(n) + ')'}")
            label = _mag(m) + (" (ref)" if m == s.reference else "")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return lines


def mde_table(counts: dict, shapes: list[str], mode: str, pk: str) -> list[str]:
    """Rows tap kinds, columns shapes: the minimum detectable magnitude (>= 99% of taps from there up)."""
    from harness.compare.policy_config import KINDS
    from harness.selftest import bug_shapes

    kinds = [k for k in KINDS if any(key.split("|")[3] == k and key.split("|")[4] == pk and key.startswith(mode + "|")
                                     for key in counts)]
    lines = ["| tap kind | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
    for kind in kinds:
        cells = []
        for name in shapes:
            s = bug_shapes.get(name)
            best = None
            for m in sorted(s.magnitudes, reverse=True):
                n, d = counts.get(f"{mode}|{name}|{m!r}|{kind}|{pk}", (0, 0))
                if n == 0 or d / n < MDE_RATE:
                    break
                best = m
            if best is None:
                n, d = counts.get(f"{mode}|{name}|{max(s.magnitudes)!r}|{kind}|{pk}", (0, 0))
                cells.append(f"none ({_rate(n, d)} at {_mag(max(s.magnitudes))})")
            else:
                cells.append(_mag(best))
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def _separates(miss_min: float, clean_max: float) -> str:
    cell = f"{miss_min:.2f} / {clean_max:.2f}"
    return f"**{cell}**" if miss_min > clean_max else cell


def miss_summary(h: dict, shapes: list[str], clean_max: dict) -> list[str]:
    """Misses at the reference magnitude grouped by (mode, shape, phase kind, kind), with the statistic
    nearest its limit and the candidate statistics against the clean taps' worst."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for m in h["misses"]:
        if m["mode"] == "isolated":   # the target's mode; cumulative misses stay in the JSON
            groups[(m["mode"], m["shape"], phase_kind(m["phase"]), m["kind"])].append(m)
    if not groups:
        return ["No misses at the reference magnitudes."]
    from harness.selftest import bug_shapes

    lines = ["| mode | shape | phase | tap kind | misses / taps | nearest limit (share of sampled misses) | "
             "median of limit | rel err / baseline rel err (median) | "
             + " | ".join(f"{c}: misses min / clean max" for c in CANDIDATES) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(CANDIDATES)]
    for (mode, shape, pk, kind), ms in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], -len(kv[1]))):
        stats: dict[str, int] = defaultdict(int)
        for m in ms:
            stats[m["nearest"]] += 1
        top = ", ".join(f"{k} {v}/{len(ms)}" for k, v in sorted(stats.items(), key=lambda kv: -kv[1]))
        ratios = [m["rel_fro"] / m["baseline_rel_fro"] for m in ms if m.get("baseline_rel_fro")]
        clean = {stat: clean_max.get(f"{mode}|{kind}|{pk}|{stat}", float("nan")) for stat in CANDIDATES}
        n, d = h["counts"].get(f"{mode}|{shape}|{bug_shapes.get(shape).reference!r}|{kind}|{pk}", (0, 0))
        lines.append(f"| {mode} | {shape} | {pk} | {kind} | {n - d}/{n} | {top} | "
                     f"{np.median([m['of_limit'] for m in ms]):.2f} | "
                     f"{np.median(ratios) if ratios else float('nan'):.2f} | "
                     + " | ".join(_separates(min(m[stat] for m in ms), clean[stat]) for stat in CANDIDATES) + " |")
    return lines


def markdown(hosts: dict, shapes: list[str], modes: list[str], command: str, policy: list[str], elapsed: float) -> str:
    out = [f"Command: `{command}`; {elapsed:.0f} s.", "", "Policy (overrides, then the set of the first model):", ""]
    out += [f"- `{p}`" for p in policy] or ["- the default PolicySet"]
    out.append("")
    clean_max: dict[str, float] = {}   # over every host of the run: the spread of correct values
    for h in hosts.values():
        for key, v in h["clean_stats"].items():
            clean_max[key] = max(clean_max.get(key, 0.0), v)
    for host, h in hosts.items():
        out += [f"## Host `{host}`", ""]
        for mode in modes:
            n, f = count_where(h["host_taps"], lambda k, mode=mode: k[0] == mode)
            out.append(f"- {mode}: {n} host taps, {f} failed by the host itself (left out)")
        if h["errors"]:
            out += [f"- could not run: {e}" for e in h["errors"]]
        out += ["", "### Detection at the perturbed tap (all tap kinds)", "",
                f"Reference magnitudes marked (ref); a rate under {100 * TARGET:g}% at (ref) in isolated mode is a miss of the target.", ""]
        out += reference_table(h["counts"], shapes, modes)
        for mode in modes:
            for pk in ("prefill", "decode"):
                out += ["", f"### Minimum detectable magnitude per tap kind: {mode}, {pk}", ""]
                out += mde_table(h["counts"], shapes, mode, pk)
        out += ["", f"### Misses at the reference magnitude ({h['miss_total']} in isolated mode; up to {MISS_SAMPLES} "
                f"sampled per (model, seed, mode, shape, phase kind))", "",
                "Nearest limit: the judged statistic closest to its limit (value / limit, median over the misses). "
                "Candidate statistics (docs/bug-shapes.md): r_row, the worst token's R; r_block, the worst "
                "head-sized block's relative error over the baseline's there; ulp_row / ulp_block, the worst row's / "
                "block's RMS ULP error over the baseline's there; lean, |mean ULP error signed along the golden|. "
                "Each cell: its smallest value on the misses / its largest on the clean taps of that kind of every "
                "host in this run; bold when it separates them (the misses' smallest exceeds the clean taps' largest). "
                "A host that is the baseline itself (the emulator) or the golden (replay-fp32) spreads less than other "
                "correct implementations: add validation members as hosts for a fair clean maximum.", ""]
        out += miss_summary(h, shapes, clean_max)
        out.append("")
    return "\n".join(out)


def policy_texts(model: str, overrides: list[str]) -> list[str]:
    """The policy set's entries as ``key = policy text (source)``, e.g. for the record of a run."""
    from harness.compare.policy_config import PolicySet
    from harness.spec import model_spec

    ps = PolicySet.for_model(model_spec.get(model, "tiny"), overrides=list(overrides) or None)
    return [f"{key} = {d['policy']} ({d['source']})" for key, d in ps.describe().items()]


def render_saved(path: Path) -> int:
    """Print the Markdown of a saved run (exit as the run would)."""
    try:
        saved = json.loads(path.read_text())
        md = markdown(saved["hosts"], list(saved["shapes"]), saved["modes"], saved["command"], saved["policy"],
                      saved["elapsed_s"])
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {path}: cannot re-render: {exc}", file=sys.stderr)
        return 3
    print(md)
    return 0 if target_met(saved["hosts"], list(saved["shapes"])) else 1


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    from harness.errors import HarnessError
    from harness.selftest import bug_shapes
    from harness.spec.model_spec import names

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="all", help="Comma-separated model ids. Default: all nine.")
    p.add_argument("--seeds", default="0-3", help="Seeds, 'a-b' or 'a,b,c'. Default: 0-3.")
    p.add_argument("--host", action="append", default=None,
                   help="Host deployment (a --deployment target); repeat for several. Default: emulator, replay-fp32.")
    p.add_argument("--modes", default="isolated,cumulative", help="Default: isolated,cumulative.")
    p.add_argument("--shapes", default="all", help=f"Comma-separated shapes. Default: all ({', '.join(bug_shapes.SHAPES)}).")
    p.add_argument("--decode-steps", type=int, default=2, help="Decode steps. Default: 2.")
    p.add_argument("--policy", action="append", default=[], help="Policy override (as harness gate --policy); repeatable.")
    p.add_argument("--jobs", type=int, default=2, help="Worker processes, at most 2; 1 runs in this process. Default: 2.")
    p.add_argument("--golden-dir", default=None, help="Golden store. Default: the project's golden/.")
    p.add_argument("--out", default="reports/bug_shapes", help="Output directory. Default: reports/bug_shapes.")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="Re-render the Markdown of a saved bug_shapes.json (no sweep); prints it.")
    args = p.parse_args(argv)
    if args.from_json:
        return render_saved(Path(args.from_json))
    try:
        models = names() if args.models == "all" else [m.strip() for m in args.models.split(",")]
        shapes = list(bug_shapes.SHAPES) if args.shapes == "all" else [s.strip() for s in args.shapes.split(",")]
        for s in shapes:
            bug_shapes.get(s)
        modes = [m.strip() for m in args.modes.split(",")]
        if not set(modes) <= {"isolated", "cumulative"}:
            raise HarnessError(f"--modes {args.modes!r}: expected isolated and/or cumulative")
        hosts = args.host or ["emulator", "replay-fp32"]
        seeds = _seeds(args.seeds)
    except (HarnessError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    jobs = [(h, m, s, args.decode_steps, args.golden_dir, tuple(args.policy), shapes, modes)
            for h in hosts for s in seeds for m in models]
    t0 = time.perf_counter()
    results = []
    pool = ProcessPoolExecutor(min(2, args.jobs)) if args.jobs > 1 else None   # 1: in this process
    try:
        for res in (pool.map(sweep_job, jobs) if pool else map(sweep_job, jobs)):
            results.append(res)
            print(f"{res['host']} {res['model']} seed {res['seed']}: {res['miss_total']} isolated misses at reference, "
                  f"{res['seconds']} s{' ERROR ' + res['error'] if res['error'] else ''}", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.shutdown()
    elapsed = round(time.perf_counter() - t0, 1)  # the value saved: a re-render from the JSON gives the same text
    merged = merge(results)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bug_shape_sweep.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    policy = [*args.policy, *policy_texts(models[0], args.policy)]
    md = markdown(merged, shapes, modes, command.strip(), policy, elapsed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bug_shapes.md").write_text(md + "\n")
    (out / "bug_shapes.json").write_text(json.dumps({
        "command": command.strip(), "policy": policy, "models": models, "seeds": seeds, "modes": modes,
        "shapes": {n: {"meaning": bug_shapes.get(n).meaning, "magnitudes": list(bug_shapes.get(n).magnitudes),
                       "reference": bug_shapes.get(n).reference} for n in shapes},
        "decode_steps": args.decode_steps, "elapsed_s": elapsed, "hosts": merged}, indent=1) + "\n")
    print(md)
    if any(h["errors"] for h in merged.values()):
        return 3
    return 0 if target_met(merged, shapes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
