"""Root conftest: the harness's own pytest plugin is loaded through its pytest11 entry point."""
import os


def pytest_configure(config):
    # Under pytest-xdist each worker runs on one thread (torch and the metrics kernels): two workers
    # x two threads would oversubscribe two cores, and tiny models run several times faster without
    # thread hand-off.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from harness.threads import use_one_thread

        use_one_thread()
