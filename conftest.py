"""Root conftest: the harness's own pytest plugin is loaded through its pytest11 entry point."""
import os


def pytest_configure(config):
    # Under pytest-xdist each worker runs torch on one thread: two workers x two threads would
    # oversubscribe two cores, and tiny models run several times faster without thread hand-off.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
