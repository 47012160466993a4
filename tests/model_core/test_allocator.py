"""glibc malloc thresholds that let freed tensor memory be reused (model_core.allocator)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

needs_glibc = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's"
)

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter, so that the heap state of the test process does not matter.
# Each round allocates and frees buffers of 0.9 to 3.7 MB, about 11 MB in all, as the
# post-processing of a 640x480 normals map does. The script prints the minor page faults per
# round (pages that the kernel had to map and zero) before and after the call.
_ROUNDS = textwrap.dedent(
    """
    import resource

    import numpy as np

    from model_core.allocator import reuse_freed_memory

    def faults_per_round(rounds=40):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            normals = np.ones((480, 640, 3), np.float32)
            levels = ((normals + 1.0) * 127.5).astype(np.uint8)
            int(levels.sum()) + float(np.ones(300_000).sum())
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

    before = faults_per_round()
    applied = reuse_freed_memory()
    faults_per_round(1)  # the heap grows to hold one round's buffers
    print(before, applied, faults_per_round())
    """
)


def _run(env_extra: dict[str, str]) -> tuple[float, bool, float]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"
    }
    env.update(env_extra, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _ROUNDS],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    before, applied, after = result.stdout.split()
    return float(before), applied == "True", float(after)


@needs_glibc
def test_freed_buffers_are_reused_without_new_page_faults():
    before, applied, after = _run({})
    assert applied
    # 11 MB per round are about 2,600 pages of 4 KiB. Reused memory needs next to none of them.
    assert after < 100, f"{after} page faults per round after the call ({before} before)"


@needs_glibc
@pytest.mark.parametrize(
    "variable",
    [
        {"MALLOC_TRIM_THRESHOLD_": "134217728"},
        {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.trim_threshold=134217728"},
    ],
)
def test_environment_threshold_kept_other_raised(variable):
    # glibc stops adjusting the mmap threshold once the trim threshold is set, so without
    # the raised mmap threshold every round would map its buffers afresh.
    before, applied, after = _run(variable)
    assert not applied
    assert after < 100, f"{after} page faults per round after the call ({before} before)"


@needs_glibc
def test_environment_mmap_threshold_is_kept():
    # A 1 MiB mmap threshold maps the 3.7 MB buffers afresh in every round, whatever the
    # trim threshold: the environment's value wins over ours.
    _, applied, after = _run({"MALLOC_MMAP_THRESHOLD_": "1048576"})
    assert not applied
    assert after > 1000


@needs_glibc
def test_unknown_tunable_name_is_ignored():
    _, applied, after = _run({"GLIBC_TUNABLES": "xglibc.malloc.mmap_threshold=1"})
    assert applied
    assert after < 100
