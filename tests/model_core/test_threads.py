"""Torch thread counts per calling thread (model_core.threads)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from model_core.threads import use_torch_threads

needs_linux = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task"), reason="threads are counted in /proc/self/task"
)

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter, so that OpenMP teams of the test process do not count. One
# thread runs torch on 2 threads and four others run the same operation, either after
# use_torch_threads(1) or with the count they inherit (2, the last one set). While all five are
# alive, the script prints how many new threads the process has that Python did not start:
# OpenMP's workers.
_TEAMS = textwrap.dedent(
    """
    import os
    import sys
    import threading

    import torch

    from model_core.threads import use_torch_threads

    def native_threads():
        started_by_python = {thread.native_id for thread in threading.enumerate()}
        return {int(name) for name in os.listdir("/proc/self/task")} - started_by_python

    torch.set_num_threads(2)
    values = torch.ones(4_000_000)
    (values * 2).sum()  # the main thread's team exists before the count starts
    before = native_threads()
    finished = threading.Barrier(6)
    release = threading.Event()

    def work(count):
        if count is not None:
            use_torch_threads(count)
        (values * 2).sum()  # 4 million elements, which the thread's team splits
        finished.wait()
        release.wait()

    others = 1 if sys.argv[1] == "one" else None
    threads = [threading.Thread(target=work, args=(2,))]
    threads += [threading.Thread(target=work, args=(others,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    finished.wait()
    print(len(native_threads() - before))
    release.set()
    for thread in threads:
        thread.join()
    """
)


def _new_openmp_workers(others: str) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OMP_NUM_THREADS", None)
    result = subprocess.run(
        [sys.executable, "-c", _TEAMS, others],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@needs_linux
def test_one_thread_starts_no_team():
    # Only the thread with 2 torch threads adds an OpenMP worker.
    assert _new_openmp_workers("one") == 1


@needs_linux
def test_inherited_count_starts_a_team_per_thread():
    # Without the call, each of the four threads starts a team of 2 of its own.
    assert _new_openmp_workers("inherited") == 1 + 4


def test_count_is_set_for_calling_thread_only():
    counts: list[int] = []
    main_before = torch.get_num_threads()

    def run() -> None:
        inherited = torch.get_num_threads()
        use_torch_threads(3)
        counts.append(torch.get_num_threads())
        # Threads that start later inherit the count set last: give them the old one back.
        torch.set_num_threads(inherited)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert counts == [3]
    assert torch.get_num_threads() == main_before


@pytest.mark.parametrize("count", [0, -1])
def test_count_below_one_is_rejected(count):
    with pytest.raises(ValueError, match=f"need at least 1 thread, got {count}"):
        use_torch_threads(count)
