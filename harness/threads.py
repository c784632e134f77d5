"""One place that pins a process to a single compute thread (torch and the compiled metrics kernels).

Worker processes that share the machine's cores with siblings (pytest-xdist workers, the self-test's
process pool) call ``use_one_thread()``: two processes x two threads on two cores oversubscribe them,
and OpenMP runtimes spin while they wait, so each process would slow the other down.
"""
from __future__ import annotations


def use_one_thread() -> None:
    """Run torch and numba's parallel kernels on one thread in this process."""
    import numba
    import torch

    torch.set_num_threads(1)
    numba.set_num_threads(1)
