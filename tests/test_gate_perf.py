"""`harness gate --perf` folds the history comparison into the gate: a slower build of the same
deployment exits 2, with correctness intact."""
from harness.deployment.emulator import make_factory
from harness.suites.gate import run_gate


def _named(name: str, **knobs):
    factory = make_factory(**knobs)
    factory.name = name  # the history keys series by deployment name, as a team's CI would
    return factory


def test_gate_perf_flags_a_slower_build_of_the_same_deployment(tmp_path, golden_root):
    db = f"sqlite:///{tmp_path / 'history.sqlite'}"
    first = run_gate("qwen3-0.6b", deployment=_named("my-npu"), phase=5, perf=True, perf_db=db,
                     golden_dir=str(golden_root))
    assert first.exit_code == 0 and first.outcomes[4].status == "measured"  # nothing to compare with yet
    # 10x: the other xdist worker's load can move one run's own times by 2-3x (see test_perf_e2e.py).
    slower = run_gate("qwen3-0.6b", deployment=_named("my-npu", slowdown=10.0), phase=5, perf=True, perf_db=db,
                      golden_dir=str(golden_root))
    assert slower.exit_code == 2, slower.to_dict()["phases"]
    assert slower.outcomes[4].status == "regression"
    assert all(slower.outcomes[p].status == "pass" for p in (2, 3))  # still correct, only slower
