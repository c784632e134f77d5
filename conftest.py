"""Root conftest: the harness's own pytest plugin is loaded through its pytest11 entry point."""
import os
import shutil
import tempfile

_DIGEST_DIR: list[str] = []


def pytest_configure(config):
    # Checkpoint digests the tests' processes compute are kept for this run only, not in the user's
    # ~/.cache (harness.weights.digest_cache).
    if "NPU_HARNESS_DIGEST_CACHE" not in os.environ:
        _DIGEST_DIR.append(tempfile.mkdtemp(prefix="npu-harness-digests-"))
        os.environ["NPU_HARNESS_DIGEST_CACHE"] = os.path.join(_DIGEST_DIR[0], "checkpoint-digests.json")
    # Under pytest-xdist each worker runs on one thread (torch and the metrics kernels): two workers
    # x two threads would oversubscribe two cores, and tiny models run several times faster without
    # thread hand-off.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from harness.threads import use_one_thread

        use_one_thread()
        # The processes the tests start (a CLI gate, a deployment's child) share the two cores with the
        # other worker too: their torch runs on one thread. Not numba's: it reads NUMBA_NUM_THREADS again
        # at each compile, and this worker's own tests launch two metric threads.
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_unconfigure(config):
    for d in _DIGEST_DIR:
        shutil.rmtree(d, ignore_errors=True)


FULLSCALE_ENV = "NPU_HARNESS_FULLSCALE_TESTS"


def pytest_collection_modifyitems(config, items):
    # Full-scale tests (real-size goldens: minutes and GBs each) stay off the default run's critical
    # path; `-m fullscale` or NPU_HARNESS_FULLSCALE_TESTS=1 runs them.
    if "fullscale" in (config.getoption("markexpr") or "") or os.environ.get(FULLSCALE_ENV) == "1":
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("fullscale") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
