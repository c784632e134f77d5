"""The bug-shape sweep's engine: judge every tap x shape x magnitude on a host deployment's recorded taps.

A host runs once per mode through ``harness.check`` while ``Recording`` keeps the values it hands over;
each shape is then applied to the host's value and judged directly with ``harness.checker.judge_tap``
against the golden and the mode's baseline. In isolated mode only the perturbed tap can fail, so a
perturbation is "detected at exactly the perturbed tap" when it fails where the host's own value passes
(taps the host fails itself are left out and counted). ``benchmarks/bug_shape_sweep.py`` is the CLI and
the tables; docs/bug-shapes.md the method and the figures.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
import numpy as np

from harness.selftest.recording import Recording

TARGET = 0.995          # the detection target at the reference magnitude (isolated mode)
MDE_RATE = 0.99         # "minimum detectable": detected on at least this share of taps
ONE_ROUNDING_ULP_RMS = 0.5 / math.sqrt(3.0)   # rms ULP error of one correct rounding (uniform +-0.5)
MISS_SAMPLES = 25       # misses kept with their statistics per job and (mode, shape, phase kind)


CANDIDATES = ("r_row", "r_block", "ulp_row", "ulp_block", "lean")


def _blocks(sq: np.ndarray, block: int) -> np.ndarray:
    """[T, F // block] means of ``sq`` over aligned blocks of ``block`` features of each row."""
    width = min(block, sq.shape[1])
    blocks = max(1, sq.shape[1] // width)
    return sq[:, :blocks * width].reshape(sq.shape[0], blocks, width).mean(axis=2)


def error_parts(x: np.ndarray, golden: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """RMS error of ``x`` per row and per (row, head-sized block), in ULPs (harness.compare.metrics.ulp_error)
    and relative to the golden's RMS there (float64)."""
    from harness.compare.metrics import ulp_error

    ulp = np.square(ulp_error(x, golden))
    err = np.square(x.astype(np.float64) - golden.astype(np.float64))
    gg = np.square(golden.astype(np.float64))
    return {"ulp_row": np.sqrt(ulp.mean(axis=1)), "ulp_block": np.sqrt(_blocks(ulp, block)),
            "rel_block": np.sqrt(_blocks(err, block) / np.maximum(_blocks(gg, block), 1e-300))}


def candidates(dut: np.ndarray, golden: np.ndarray, base: dict[str, np.ndarray], metrics: dict, block: int) -> dict:
    """Candidate statistics of one tap value, ``base`` being the baseline's ``error_parts``:
    r_row (metrics' worst token_r), r_block (the worst head-sized block's relative error over the
    baseline's there, floored at half a bf16 rounding like R), ulp_row / ulp_block (the worst row's /
    block's RMS ULP error over the baseline's there, floored at one rounding), lean (|ulp_bias|, the mean
    ULP error signed along the golden over the whole tap)."""
    from harness.compare.metrics import BF16_ROUNDING_REL_RMS, R_FLOOR_ROUNDINGS

    d = error_parts(dut, golden, block)
    r_floor = R_FLOOR_ROUNDINGS * BF16_ROUNDING_REL_RMS
    return {"r_row": float(max(metrics.get("token_r") or [float("nan")])),
            "r_block": float(np.max(d["rel_block"] / np.maximum(base["rel_block"], r_floor))),
            "ulp_row": float(np.max(d["ulp_row"] / np.maximum(base["ulp_row"], ONE_ROUNDING_ULP_RMS))),
            "ulp_block": float(np.max(d["ulp_block"] / np.maximum(base["ulp_block"], ONE_ROUNDING_ULP_RMS))),
            "lean": abs(float(metrics.get("ulp_bias", float("nan"))))}


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


def sweep_job(args: tuple) -> dict:
    """``sweep_host(*args)``, for a process pool's map."""
    return sweep_host(*args)


def sweep_host(host, model: str, seed: int, steps: int, golden_dir, policy, shapes, modes) -> dict:
    """Counts and miss samples of one (host, model, seed) over ``modes``: per
    ``mode|shape|magnitude|kind|phase kind`` [taps, detected]; per ``mode|kind|phase kind`` [host taps,
    host failed]; per ``mode|kind|phase kind|candidate`` the candidate's worst value on clean taps; sampled
    misses at the reference magnitudes. ``policy``: override texts (as ``harness gate --policy``)."""
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
    t0 = time.perf_counter()
    spec = model_spec.get(model, "tiny")
    policies = PolicySet.for_model(spec, overrides=list(policy) or None)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])     # key -> [taps, detected]
    host_taps: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # mode|kind|phase kind -> [taps, host failed]
    clean_stats: dict[str, float] = {}  # mode|kind|phase kind|candidate -> its worst value on the host's clean taps
    misses: list[dict] = []
    sampled: dict[str, int] = defaultdict(int)   # misses at the reference per mode|shape|phase kind
    out = {"host": host, "model": model, "seed": seed, "counts": counts, "host_taps": host_taps,
           "clean_stats": clean_stats, "misses": misses, "error": None}
    store = GoldenStore(golden_dir)
    try:
        golden = store.get(GoldenRequest(model, "tiny", seed, steps))
        for mode in modes:
            recorded: dict[str, dict[str, np.ndarray]] = {}
            factory = bug_shapes.wrap_factory(host, lambda dep, _spec: Recording(dep, recorded), "record")
            if getattr(factory, "needs_golden", False):  # a reference replay host (the fp32 golden itself)
                from harness.deployment.replay import check_replay

                verdict = check_replay(model, factory, scale="tiny", seed=seed, decode_steps=steps, mode=mode,
                                       policy=policies, golden_dir=golden_dir)
            else:  # inline: the recording wrapper keeps the host's values in this process
                verdict = harness.check(model, factory, scale="tiny", seed=seed, decode_steps=steps, mode=mode,
                                        policy=policies, golden_dir=golden_dir, isolation="inline")
            host_passed = {(r.phase, r.tap): r.passed for r in verdict.results}
            host_metrics = {(r.phase, r.tap): r.metrics or {} for r in verdict.results}
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
                    base_parts = error_parts(base, g, spec.head_dim)
                    for stat, v in candidates(host_value, g, base_parts, host_metrics[(phase, tap)], spec.head_dim).items():
                        clean_stats[f"{where}|{stat}"] = max(clean_stats.get(f"{where}|{stat}", 0.0), v)
                    prev = recorded.get(previous_phase, {}).get(tap) if previous_phase else None
                    ctx = bug_shapes.ShapeContext(spec, phase, tap, prev)
                    for name in shapes:
                        shape = bug_shapes.get(name)
                        for m in shape.magnitudes:
                            dut = bug_shapes.perturb(host_value, ctx, name, m, seed)
                            r = judge_tap(policies, phase, tap, kind, dut, g, base, mode, spec.head_dim)
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
                                        **{k: round(v, 3) for k, v in candidates(dut, g, base_parts, met, spec.head_dim).items()}})
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
                                            "clean_stats": {}, "misses": [], "miss_total": 0, "errors": []})
        for key, (n, d) in res["counts"].items():
            h["counts"][key][0] += n
            h["counts"][key][1] += d
        for key, (n, f) in res["host_taps"].items():
            h["host_taps"][key][0] += n
            h["host_taps"][key][1] += f
        for key, v in res["clean_stats"].items():
            h["clean_stats"][key] = max(h["clean_stats"].get(key, 0.0), v)
        h["misses"].extend(dict(m, model=res["model"], seed=res["seed"]) for m in res["misses"])
        h["miss_total"] += res["miss_total"]
        if res["error"]:
            h["errors"].append(f"{res['model']} seed {res['seed']}: {res['error']}")
    for h in hosts.values():
        h["counts"], h["host_taps"] = dict(h["counts"]), dict(h["host_taps"])
    return hosts



def count_where(counts: dict, pred) -> tuple[int, int]:
    n = d = 0
    for key, (kn, kd) in counts.items():
        if pred(key.split("|")):
            n, d = n + kn, d + kd
    return n, d


def target_met(hosts: dict, shapes: list[str]) -> bool:
    from harness.selftest import bug_shapes

    for h in hosts.values():
        for name in shapes:
            ref = bug_shapes.get(name).reference
            for pk in ("prefill", "decode"):
                n, d = count_where(h["counts"], lambda k, pk=pk: k[0] == "isolated" and k[1] == name
                            and float(k[2]) == ref and k[4] == pk)
                if n and d / n < TARGET:
                    return False
    return True
