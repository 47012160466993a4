"""Provenance of the exported checkpoint: repository paths written relative to the root."""

from pathlib import Path

from training.evaluate import repo_relative


def test_repo_relative_strips_the_root(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    text = f"scenes:{root}/runs/demo/data"
    assert repo_relative(text, root) == "scenes:runs/demo/data"
    command = f"python -m training.train --init {root}/runs/a.safetensors --out {root}/runs"
    assert repo_relative(command, root) == (
        "python -m training.train --init runs/a.safetensors --out runs"
    )


def test_repo_relative_keeps_other_paths(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    # A sibling whose name starts with the root's name is outside the repository.
    assert repo_relative(f"pascal:{root}-data/VOC", root) == f"pascal:{root}-data/VOC"
    assert repo_relative("pascal:/datasets/PASCAL", root) == "pascal:/datasets/PASCAL"
    # A path that only ends with the root's path is another directory.
    assert repo_relative(f"--data /mnt{root}/runs/d", root) == f"--data /mnt{root}/runs/d"
    assert repo_relative(None, root) is None


def test_repo_relative_default_root_is_this_checkout():
    checkout = Path(__file__).resolve().parents[2]
    assert repo_relative(f"scenes:{checkout}/runs/demo/data") == "scenes:runs/demo/data"
