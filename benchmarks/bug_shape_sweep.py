"""Minimum detectable error of the gate for the generic bug shapes (harness/selftest/bug_shapes.py).

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
(the worst row's and the worst head-sized block's RMS ULP error over the baseline's) on the misses and on
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
import math
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

TARGET = 0.995          # the detection target at the reference magnitude (isolated mode)
MDE_RATE = 0.99         # "minimum detectable": detected on at least this share of taps
ONE_ROUNDING_ULP_RMS = 0.5 / math.sqrt(3.0)   # rms ULP error of one correct rounding (uniform +-0.5)
MISS_SAMPLES = 25       # misses kept with their statistics per job and (mode, shape, phase kind)


class Recording:
    """Keeps a float32 copy of every tap value the wrapped deployment hands over, keyed by phase."""

    def __init__(self, inner: Any, store: dict[str, dict[str, np.ndarray]]):
        self.inner, self.store, self.step = inner, store, 0

    def _tap(self, phase: str, tap):
        taps = self.store.setdefault(phase, {})

        def record(name, value):
            v = value.detach().cpu().numpy() if hasattr(value, "detach") else value
            taps[name] = np.array(v, dtype=np.float32, copy=True)
            return tap(name, value)
        return record

    def prefill(self, input_ids, tap):
        self.step = 0
        return self.inner.prefill(input_ids, self._tap("prefill", tap))

    def decode(self, token_id, tap):
        phase = f"decode.{self.step}"
        self.step += 1
        return self.inner.decode(token_id, self._tap(phase, tap))


def ulp_rms_parts(dut: np.ndarray, golden: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """RMS ULP error (harness.compare.metrics.ulp_error) per row [T] and per (row, aligned block of
    ``block`` features) [T, F // block]."""
    from harness.compare.metrics import ulp_error

    sq = np.square(ulp_error(dut, golden))
    blocks = max(1, sq.shape[1] // block)
    width = min(block, sq.shape[1])
    per_block = sq[:, :blocks * width].reshape(sq.shape[0], blocks, width).mean(axis=2)
    return np.sqrt(sq.mean(axis=1)), np.sqrt(per_block)


def candidates(dut: np.ndarray, golden: np.ndarray, base_parts: tuple[np.ndarray, np.ndarray], block: int) -> dict:
    """The candidate statistics: the worst row's (``ulp_rms_row``) and the worst head-sized block's
    (``ulp_rms_block``) RMS ULP error over the baseline's own there, floored at one rounding."""
    rows, blocks = ulp_rms_parts(dut, golden, block)
    return {"ulp_rms_row": float(np.max(rows / np.maximum(base_parts[0], ONE_ROUNDING_ULP_RMS))),
            "ulp_rms_block": float(np.max(blocks / np.maximum(base_parts[1], ONE_ROUNDING_ULP_RMS)))}


def nearest_limit(judgement: dict) -> tuple[str, float]:
    """(statistic, value / limit) of the judged statistic nearest its limit."""
    measured, limits = judgement.get("measured", {}), judgement.get("thresholds", {})
    best = ("?", float("nan"))
    for key, value in measured.items():
        limit = limits.get(f"{key}_max")
        if isinstance(limit, (int, float)) and limit > 0 and isinstance(value, (int, float)):
            ratio = value / limit
            if not ratio <= best[1]:  # also replaces the initial NaN
                best = (key, ratio)
    return best


def phase_kind(phase: str) -> str:
    return "decode" if phase.startswith("decode") else "prefill"


def _job(args: tuple) -> dict:
    """Counts and miss samples of one (host, model, seed) over the modes."""
    import harness
    from harness.checker import judge_tap
    from harness.compare.policy_config import PolicySet
    from harness.errors import HarnessError
    from harness.selftest import bug_shapes
    from harness.spec import model_spec
    from harness.spec.taps import parse
    from harness.store import GoldenRequest, GoldenStore
    from harness.threads import use_one_thread

    use_one_thread()
    host, model, seed, steps, golden_dir, policy, shapes, modes = args
    t0 = time.perf_counter()
    spec = model_spec.get(model, "tiny")
    policies = PolicySet.for_model(spec, overrides=list(policy) or None)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])     # key -> [taps, detected]
    host_taps: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # mode|kind|phase kind -> [taps, host failed]
    clean_ulp: dict[str, float] = {}    # mode|kind|phase kind -> worst candidate statistic on clean taps
    misses: list[dict] = []
    sampled: dict[str, int] = defaultdict(int)   # misses at the reference per mode|shape|phase kind
    out = {"host": host, "model": model, "seed": seed, "counts": counts, "host_taps": host_taps,
           "clean_ulp_rms": clean_ulp, "misses": misses, "error": None}
    store = GoldenStore(golden_dir)
    try:
        golden = store.get(GoldenRequest(model, "tiny", seed, steps))
        for mode in modes:
            recorded: dict[str, dict[str, np.ndarray]] = {}
            factory = bug_shapes.wrap_factory(host, lambda dep, _spec: Recording(dep, recorded), "record")
            verdict = harness.check(model, factory, scale="tiny", seed=seed, decode_steps=steps, mode=mode,
                                    policy=policies, golden_dir=golden_dir)
            host_passed = {(r.phase, r.tap): r.passed for r in verdict.results}
            gs = store.ensure_local(golden) if mode == "isolated" else golden
            variant = "local" if mode == "isolated" else "bf16"
            previous_phase = None
            for phase in gs.phases:
                pk = phase_kind(phase)
                for tap, host_value in recorded.get(phase, {}).items():
                    kind = parse(tap).kind
                    where = f"{mode}|{kind}|{pk}"
                    host_taps[where][0] += 1
                    if not host_passed.get((phase, tap), False):
                        host_taps[where][1] += 1
                        continue
                    g, base = gs.tensor(phase, tap, "fp32"), gs.tensor(phase, tap, variant)
                    base_parts = ulp_rms_parts(base, g, spec.head_dim)
                    for stat, v in candidates(host_value, g, base_parts, spec.head_dim).items():
                        clean_ulp[f"{where}|{stat}"] = max(clean_ulp.get(f"{where}|{stat}", 0.0), v)
                    prev = recorded.get(previous_phase, {}).get(tap) if previous_phase else None
                    ctx = bug_shapes.ShapeContext(spec, phase, tap, prev)
                    for name in shapes:
                        shape = bug_shapes.get(name)
                        for m in shape.magnitudes:
                            dut = bug_shapes.perturb(host_value, ctx, name, m, seed)
                            r = judge_tap(policies, phase, tap, kind, dut, g, base, mode)
                            c = counts[f"{mode}|{name}|{m!r}|{kind}|{pk}"]
                            c[0] += 1
                            if not r.passed:
                                c[1] += 1
                            elif m == shape.reference:
                                group = f"{mode}|{name}|{pk}"
                                sampled[group] += 1
                                if sampled[group] <= MISS_SAMPLES:
                                    stat, ratio = nearest_limit(r.judgement or {})
                                    met = r.metrics or {}
                                    misses.append({
                                        "mode": mode, "shape": name, "magnitude": m, "phase": phase, "tap": tap,
                                        "kind": kind, "nearest": stat, "of_limit": round(ratio, 3),
                                        "measured": {k: round(v, 4) for k, v in (r.judgement or {}).get("measured", {}).items()},
                                        "rel_fro": met.get("rel_fro"), "baseline_rel_fro": met.get("baseline_rel_fro"),
                                        "ulp_p99": met.get("ulp_p99"), "baseline_ulp_p99": met.get("baseline_ulp_p99"),
                                        **{k: round(v, 3) for k, v in candidates(dut, g, base_parts, spec.head_dim).items()}})
                previous_phase = phase
    except HarnessError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["counts"], out["host_taps"] = dict(counts), dict(host_taps)
    out["miss_total"] = sum(v for k, v in sampled.items() if k.startswith("isolated|"))
    return out


# -- aggregation and tables ----------------------------------------------------------------------

def merge(results: list[dict]) -> dict:
    """Totals per host: counts, host taps, worst clean candidate statistic, misses."""
    hosts: dict[str, dict] = {}
    for res in results:
        h = hosts.setdefault(res["host"], {"counts": defaultdict(lambda: [0, 0]), "host_taps": defaultdict(lambda: [0, 0]),
                                            "clean_ulp_rms": {}, "misses": [], "miss_total": 0, "errors": []})
        for key, (n, d) in res["counts"].items():
            h["counts"][key][0] += n
            h["counts"][key][1] += d
        for key, (n, f) in res["host_taps"].items():
            h["host_taps"][key][0] += n
            h["host_taps"][key][1] += f
        for key, v in res["clean_ulp_rms"].items():
            h["clean_ulp_rms"][key] = max(h["clean_ulp_rms"].get(key, 0.0), v)
        h["misses"].extend(dict(m, model=res["model"], seed=res["seed"]) for m in res["misses"])
        h["miss_total"] += res["miss_total"]
        if res["error"]:
            h["errors"].append(f"{res['model']} seed {res['seed']}: {res['error']}")
    for h in hosts.values():
        h["counts"], h["host_taps"] = dict(h["counts"]), dict(h["host_taps"])
    return hosts


def _rate(n: int, d: int) -> str:
    return "-" if n == 0 else f"{100.0 * d / n:.1f}%"


def _sum(counts: dict, pred) -> tuple[int, int]:
    n = d = 0
    for key, (kn, kd) in counts.items():
        if pred(key.split("|")):
            n, d = n + kn, d + kd
    return n, d


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
                n, d = _sum(counts, lambda k, mode=mode, pk=pk, m=m: k[0] == mode and k[1] == name
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


def miss_summary(h: dict, shapes: list[str]) -> list[str]:
    """Misses at the reference magnitude grouped by (mode, shape, phase kind, kind), with the statistic
    nearest its limit and the candidate ulp_rms statistic against the clean hosts' worst."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for m in h["misses"]:
        if m["mode"] == "isolated":   # the target's mode; cumulative misses stay in the JSON
            groups[(m["mode"], m["shape"], phase_kind(m["phase"]), m["kind"])].append(m)
    if not groups:
        return ["No misses at the reference magnitudes."]
    from harness.selftest import bug_shapes

    lines = ["| mode | shape | phase | tap kind | misses / taps | nearest limit (share of sampled misses) | "
             "median of limit | rel err / baseline rel err (median) | ulp_rms_row: misses min / clean max | "
             "ulp_rms_block: misses min / clean max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (mode, shape, pk, kind), ms in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], -len(kv[1]))):
        stats: dict[str, int] = defaultdict(int)
        for m in ms:
            stats[m["nearest"]] += 1
        top = ", ".join(f"{k} {v}/{len(ms)}" for k, v in sorted(stats.items(), key=lambda kv: -kv[1]))
        ratios = [m["rel_fro"] / m["baseline_rel_fro"] for m in ms if m.get("baseline_rel_fro")]
        clean = {stat: h["clean_ulp_rms"].get(f"{mode}|{kind}|{pk}|{stat}", float("nan"))
                 for stat in ("ulp_rms_row", "ulp_rms_block")}
        n, d = h["counts"].get(f"{mode}|{shape}|{bug_shapes.get(shape).reference!r}|{kind}|{pk}", (0, 0))
        lines.append(f"| {mode} | {shape} | {pk} | {kind} | {n - d}/{n} | {top} | "
                     f"{np.median([m['of_limit'] for m in ms]):.2f} | "
                     f"{np.median(ratios) if ratios else float('nan'):.2f} | "
                     + " | ".join(f"{min(m[stat] for m in ms):.2f} / {clean[stat]:.2f}" for stat in clean) + " |")
    return lines


def markdown(hosts: dict, shapes: list[str], modes: list[str], command: str, policy: list[str], elapsed: float) -> str:
    out = [f"Command: `{command}`", "",
           f"Policy: {'the default PolicySet (calibrated) with overrides ' + repr(policy) if policy else 'the default PolicySet (calibrated, harness/compare/policies.py)'}; "
           f"{elapsed:.0f} s.", ""]
    for host, h in hosts.items():
        out += [f"## Host `{host}`", ""]
        for mode in modes:
            n, f = _sum(h["host_taps"], lambda k, mode=mode: k[0] == mode)
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
                "Candidate statistics: ulp_rms_row, the worst row's RMS ULP error over the baseline's own in that row, "
                "and ulp_rms_block, the same over aligned head_dim-wide blocks of a row (both floored at one "
                "rounding, 0.29 ULP): their smallest value on the misses next to their largest on the host's own "
                "clean taps of that kind (a statistic separates them when the first exceeds the second).", ""]
        out += miss_summary(h, shapes)
        out.append("")
    return "\n".join(out)


def target_met(hosts: dict, shapes: list[str]) -> bool:
    from harness.selftest import bug_shapes

    for h in hosts.values():
        for name in shapes:
            ref = bug_shapes.get(name).reference
            for pk in ("prefill", "decode"):
                n, d = _sum(h["counts"], lambda k, pk=pk: k[0] == "isolated" and k[1] == name
                            and float(k[2]) == ref and k[4] == pk)
                if n and d / n < TARGET:
                    return False
    return True


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
        for res in (pool.map(_job, jobs) if pool else map(_job, jobs)):
            results.append(res)
            print(f"{res['host']} {res['model']} seed {res['seed']}: {res['miss_total']} isolated misses at reference, "
                  f"{res['seconds']} s{' ERROR ' + res['error'] if res['error'] else ''}", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.shutdown()
    elapsed = time.perf_counter() - t0
    merged = merge(results)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bug_shape_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(merged, shapes, modes, command.strip(), args.policy, elapsed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bug_shapes.md").write_text(md + "\n")
    (out / "bug_shapes.json").write_text(json.dumps({
        "command": command.strip(), "policy": args.policy, "models": models, "seeds": seeds, "modes": modes,
        "shapes": {n: {"meaning": bug_shapes.get(n).meaning, "magnitudes": list(bug_shapes.get(n).magnitudes),
                       "reference": bug_shapes.get(n).reference} for n in shapes},
        "decode_steps": args.decode_steps, "elapsed_s": round(elapsed, 1), "hosts": merged}, indent=1) + "\n")
    print(md)
    if any(h["errors"] for h in merged.values()):
        return 3
    return 0 if target_met(merged, shapes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
