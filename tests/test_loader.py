"""--deployment strings: MODULE:FACTORY, built-in names, and emulator knobs."""
import pytest

from harness.deployment.loader import DeploymentError, describe, load_factory
from harness.errors import HarnessError


def test_emulator_knobs_and_faults():
    f = load_factory("emulator[slowdown=1.15,acc_dtype=bf16,k_tile=32]")
    assert (f.config.slowdown, f.config.acc_dtype, f.config.k_tile) == (1.15, "bf16", 32)
    assert describe(f) == "emulator[slowdown=1.15,acc_dtype=bf16,k_tile=32]"
    assert load_factory("emulator[faults=interleaved_rope+skipped_final_norm]").faults == (
        "interleaved_rope", "skipped_final_norm")


def test_bad_knobs_are_named():
    with pytest.raises(HarnessError, match="unknown emulator knob.*bogus"):
        load_factory("emulator[bogus=1]")
    with pytest.raises(DeploymentError, match="'slowdown' is not KNOB=VALUE"):
        load_factory("emulator[slowdown]")
    with pytest.raises(HarnessError, match="unknown emulator fault 'nope'"):
        load_factory("emulator[faults=nope]")


def test_module_factory_errors():
    with pytest.raises(DeploymentError, match="expected MODULE:FACTORY"):
        load_factory("justaname")
    with pytest.raises(DeploymentError, match="has no attribute 'nope'"):
        load_factory("harness.deployment.emulator:nope")
    assert callable(load_factory("replay-bf16")) and callable(load_factory(None))


def test_one_history_series_per_deployment_identity() -> None:
    from harness.deployment.loader import DEFAULT_DEPLOYMENT, identity

    same = {identity(None), identity("emulator"), identity(DEFAULT_DEPLOYMENT), identity("emulator[]"),
            identity("emulator[k_tile=64]")}
    assert same == {"emulator"}
    assert identity("emulator[slowdown=1.15,acc_dtype=bf16]") == identity("emulator[acc_dtype=bf16, slowdown=1.15]") \
        == "emulator[acc_dtype=bf16,slowdown=1.15]"
    assert identity("mypkg.npu:factory") == "mypkg.npu:factory"
