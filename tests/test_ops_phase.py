"""Phase 1 judges the deployment's own kernel design: its accumulator knob reaches the op cases."""
import harness
from harness.suites.ops_phase import op_ids, run_ops


def test_bf16_accumulator_fails_the_exact_probes_and_clean_passes():
    spec = harness.models.get("qwen2.5-0.5b", "tiny")
    clean = run_ops(spec, "emulator")
    assert clean and all(c.passed for c in clean)
    bad = {c.id: c for c in run_ops(spec, "emulator[acc_dtype=bf16]")}
    assert sorted(bad) == sorted(op_ids(spec))  # the same check ids whatever the knob
    # down_proj (K = intermediate = 1216): partial sums pass 256, so a bf16 accumulator must miss bits
    long_k = [c for cid, c in bad.items() if cid.startswith(("probe:gemm[M=64,K=1216", "probe:gemv[K=1216"))]
    assert len(long_k) == 2 and not any(c.passed for c in long_k)
