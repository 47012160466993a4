"""Keep torch to one OpenMP team per process when several threads call torch.

With OpenMP (torch's CPU builds for Linux use GNU libgomp), each thread that starts parallel
work gets a team of worker threads of its own, sized by that thread's setting of
`torch.set_num_threads`. A thread that has never set it takes the count set last by any
thread. Between parallel regions a worker spins 300,000 times before it sleeps, but only 100
times once there are more OpenMP threads than CPUs (libgomp manual, GOMP_SPINCOUNT). So a
second team on a machine with few cores puts every worker to sleep between the hundreds of
parallel regions of a forward pass, and each region waits for the kernel to wake them.

Measured on 2 cores (medians of 70 passes, development machine): a batch-1 pass of the demo
model took 13.2 to 14.9 ms when only its own thread had run torch. It took 24.4 to 32.8 ms
after another thread had run torch with 2 threads, and 24.3 ms with `OMP_WAIT_POLICY=PASSIVE`,
under which workers sleep at once.

A server therefore gives the thread that runs the model its thread count and every other
thread that calls torch one thread, which never starts a team.
"""

from __future__ import annotations

__all__ = ["use_torch_threads"]


def use_torch_threads(count: int) -> None:
    """Set the number of threads that torch uses for work started from the calling thread.

    `torch.set_num_threads` sets OpenMP's and MKL's count for the calling thread only, and the
    default for threads that have not called torch yet. Call this in each thread before its
    first torch operation, so that no thread depends on the order in which they started.
    """
    import torch  # here, so that importing the service does not load torch

    if count < 1:
        raise ValueError(f"need at least 1 thread, got {count}")
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
