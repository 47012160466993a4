"""Tests of the three recipe stages on the tiny preset and procedural scenes at 64 px."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_core.checkpoint import load_checkpoint, save_checkpoint
from model_core.model import AdaMTL
from model_core.presets import get_preset
from training.datasets.common import collate_samples
from training.datasets.scenes import ScenesDataset, generate_split
from training.datasets.transforms import test_transform
from training.engine import DistributedContext
from training.losses import DEFAULT_TASK_WEIGHTS
from training.stages import (
    FrozenPolicySlices,
    build_optimizer,
    draw_budget,
    efficiency_terms,
    label_class_weights,
    prepare_epoch,
    sample_budget,
    with_precision,
)
from training.train import build_parser, main

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    generate_split(root, "train", count=28, size=64, seed=0)
    generate_split(root, "val", count=8, size=64, seed=1)
    return root


@pytest.fixture(scope="module")
def batch(data_root):
    dataset = ScenesDataset(data_root, "train", test_transform(64))
    return collate_samples([dataset[i] for i in range(8)])


def parse(data_root, out, *extra):
    common = ["--data", str(data_root), "--out", str(out), "--calibration-images", "4"]
    common += ["--batch-size", "4", "--threads", "1", "--log-every", "100", "--warmup-steps", "1"]
    return build_parser().parse_args([*common, *extra])


def fresh_checkpoint(path: Path, keep_bias: float | None = None) -> Path:
    """Save an untrained tiny model; `keep_bias` sets the policies' output bias."""
    torch.manual_seed(0)
    model = AdaMTL(get_preset("tiny"))
    if keep_bias is not None:
        with torch.no_grad():
            for policy in model.policies:
                policy.block_out.bias.fill_(keep_bias)
                policy.token_out.bias.fill_(keep_bias)
    return save_checkpoint(model, path, provenance={"stage": "static"})


def mask_means(model: AdaMTL, images: torch.Tensor, budget: float) -> tuple[float, float, float]:
    """Return mean block mask, mean token mask and mean FLOPs ratio of training-mode gates."""
    model.train()
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        stats = model(images, budget, generator=generator, compute_outputs=False).stats
    return (
        float(stats.block_keep.mean()),
        float(stats.token_keep.mean()),
        float(stats.flops_ratio.mean()),
    )


def test_main_validates_before_loading_data(data_root, tmp_path):
    missing_init = parse(data_root, tmp_path, "--stage", "cotrain")
    with pytest.raises(ValueError, match="--init is required"):
        main(missing_init)
    no_data = parse(tmp_path / "absent", tmp_path, "--stage", "static", "--preset", "tiny")
    with pytest.raises(ValueError, match="--data folder not found"):
        main(no_data)
    bad_epochs = parse(
        data_root, tmp_path, "--stage", "static", "--preset", "tiny", "--epochs", "0"
    )
    with pytest.raises(ValueError, match="--epochs 0"):
        main(bad_epochs)
    assert not (tmp_path / "static").exists(), "validation must fail before anything is written"


def test_main_rejects_non_finite_floats(data_root, tmp_path):
    static = ("--stage", "static", "--preset", "tiny")
    for option, value, message in (
        ("--lr", "nan", "invalid --lr nan: must be a finite number"),
        ("--policy-lr", "inf", "invalid --policy-lr inf"),
        ("--alpha", "inf", "invalid --alpha inf"),
        ("--distill", "nan", "invalid --distill nan"),
        ("--weight-decay", "nan", "invalid --weight-decay nan"),
        ("--calibration-tolerance", "nan", "invalid --calibration-tolerance nan"),
        ("--grad-clip", "-1", "invalid --grad-clip -1.0: must not be negative"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            main(parse(data_root, tmp_path, *static, option, value))
    assert not (tmp_path / "static").exists(), "validation must fail before anything is written"


def test_init_rejects_other_preset_and_backbone(data_root, tmp_path):
    init = fresh_checkpoint(tmp_path / "tiny.safetensors")
    other_preset = parse(
        data_root, tmp_path, "--stage", "policy_init", "--init", str(init), "--preset", "demo"
    )
    with pytest.raises(ValueError, match=r"--preset demo differs from preset tiny of --init"):
        main(other_preset)
    backbone = tmp_path / "backbone.pth"
    backbone.write_bytes(b"")
    with_backbone = parse(
        data_root, tmp_path, "--stage", "policy_init", "--init", str(init), "--backbone",
        str(backbone),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"--backbone applies only to a static stage"):
        main(with_backbone)
    assert not (tmp_path / "policy_init" / "model.safetensors").exists()


def test_static_stage_outputs(data_root, tmp_path):
    args = parse(
        data_root, tmp_path, "--stage", "static", "--preset", "tiny", "--epochs", "2",
        "--steps-per-epoch", "2", "--lr", "1e-3",
    )  # fmt: skip
    path = main(args)
    model, metadata = load_checkpoint(path)
    assert model.config.name == "tiny"
    provenance = metadata["provenance"]
    assert provenance["stage"] == "static"
    assert provenance["seed"] == 0
    assert str(data_root) in provenance["dataset"]
    assert len(provenance["git_commit"]) == 40
    assert provenance["schedule"]["epochs"] == 2

    stage_dir = tmp_path / "static"
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["steps"] == 2 for r in records)
    resolved = json.loads((stage_dir / "config.json").read_text())
    assert resolved["git_commit"] == provenance["git_commit"]
    assert resolved["train_images"] == 24
    assert resolved["calibration_images"] == 4
    log = (stage_dir / "train.log").read_text()
    assert log.index("resolved configuration") < log.index("static epoch 1/2 step 2/2")
    assert log.index("git commit") < log.index("static epoch 1/2 step 2/2")
    state = torch.load(stage_dir / "state.pt", weights_only=True)
    assert state["epoch"] == 2


def test_resume_rejects_changed_options(data_root, tmp_path):
    static = ("--stage", "static", "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "1")
    first = main(parse(data_root, tmp_path, *static))
    config = (tmp_path / "static" / "config.json").read_text()
    written = first.stat().st_mtime_ns
    for changed, message in (
        (("--seed", "3"), "--seed 0 (now 3)"),
        (("--epochs", "2"), "--epochs 1 (now 2)"),
        (("--lr", "0.01"), "--lr 0.0001 (now 0.01)"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            main(parse(data_root, tmp_path, *static, *changed))
    assert first.stat().st_mtime_ns == written, "a rejected resume must not rewrite the model"
    assert (tmp_path / "static" / "config.json").read_text() == config

    # The same options with another log interval resume, and --restart trains again.
    main(parse(data_root, tmp_path, *static, "--log-every", "5"))
    restarted = main(parse(data_root, tmp_path, *static, "--seed", "3", "--restart"))
    assert load_checkpoint(restarted)[1]["provenance"]["seed"] == 3


def test_label_class_weights_from_training_labels(data_root):
    dataset = ScenesDataset(data_root, "train", test_transform(64))
    config = get_preset("tiny")
    weights = label_class_weights(dataset, config)
    assert set(weights) == {"human_parts", "semseg"}
    counts = torch.zeros(len(config.classes["semseg"]))
    for index in range(len(dataset)):
        labels = dataset[index]["semseg"].reshape(-1)
        counts += torch.bincount(labels[labels != 255], minlength=len(counts)).float()
    frequency = counts / counts.sum()
    # Rarer classes weigh more, and the mean weight over the labelled pixels is 1.
    rare, common = int(frequency[frequency > 0].argmin()), int(frequency.argmax())
    assert weights["semseg"][rare] > weights["semseg"][common]
    assert float((frequency * weights["semseg"]).sum()) == pytest.approx(1.0, rel=1e-5)


def test_static_stage_with_class_weights_records_them(data_root, tmp_path):
    args = parse(
        data_root, tmp_path, "--stage", "static", "--preset", "tiny", "--epochs", "1",
        "--steps-per-epoch", "1", "--class-weights", "balanced",
    )  # fmt: skip
    path = main(args)
    _, metadata = load_checkpoint(path)
    assert metadata["provenance"]["schedule"]["class_weights"] == "balanced"
    resolved = json.loads((tmp_path / "static" / "config.json").read_text())
    assert len(resolved["class_weights"]["semseg"]) == len(get_preset("tiny").classes["semseg"])


def test_policy_init_drives_masks_towards_one(data_root, batch, tmp_path):
    init = fresh_checkpoint(tmp_path / "static.safetensors", keep_bias=-2.0)
    start, _ = load_checkpoint(init)
    blocks_before, tokens_before, _ = mask_means(start, batch["image"], 0.6)
    assert blocks_before < 0.7
    assert tokens_before < 0.7

    args = parse(
        data_root, tmp_path, "--stage", "policy_init", "--init", str(init), "--epochs", "3",
        "--steps-per-epoch", "4", "--policy-lr", "0.05",
    )  # fmt: skip
    trained, _ = load_checkpoint(main(args))
    blocks_after, tokens_after, _ = mask_means(trained, batch["image"], 0.6)
    assert blocks_after > blocks_before + 0.15, (blocks_before, blocks_after)
    assert tokens_after > tokens_before + 0.15, (tokens_before, tokens_after)

    records = (tmp_path / "policy_init" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in records]
    assert losses[-1] < losses[0]
    # Encoder and heads are frozen, batch norm statistics included.
    before, after = start.state_dict(), trained.state_dict()
    for name, tensor in before.items():
        if not name.startswith("policies."):
            assert torch.equal(tensor, after[name]), name


def test_att_step_freezes_other_tasks(data_root, batch, tmp_path):
    torch.manual_seed(0)
    model = AdaMTL(get_preset("tiny"))
    context = DistributedContext()
    tasks = list(model.config.tasks)
    end_to_end = parse(data_root, tmp_path, "--stage", "cotrain", "--att-epochs", "0")
    optimizer = build_optimizer(model, end_to_end)

    # One end-to-end step first, so that Adam has momentum for every head and policy row.
    plan = prepare_epoch(model, end_to_end, 0, context)
    optimizer.zero_grad(set_to_none=True)
    plan.loss_function(model, batch).loss.backward()
    optimizer.step()

    att = parse(data_root, tmp_path, "--stage", "cotrain", "--att-epochs", "4")
    plan = prepare_epoch(model, att, 2, context)
    focus = tasks.index("semseg")
    assert plan.focus_task == "semseg"
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.zero_grad(set_to_none=True)
    plan.loss_function(model, batch).loss.backward()

    for task in tasks:
        grads = [p.grad for p in model.heads[task].parameters()]
        if task == "semseg":
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads), task
    num_tasks = len(tasks)
    for index, policy in enumerate(model.policies):
        for name in ("block_out", "token_out"):
            layer = getattr(policy, name)
            grad = layer.weight.grad.view(policy.depth, num_tasks, policy.hidden)
            bias_grad = layer.bias.grad.view(policy.depth, num_tasks)
            for task in range(num_tasks):
                if task == focus:
                    continue
                assert grad[:, task].abs().max() == 0, (index, name, task)
                assert bias_grad[:, task].abs().max() == 0, (index, name, task)
            if name == "token_out":
                assert grad[:, focus].abs().max() > 0, (index, name)

    optimizer.step()
    plan.after_step()
    after = dict(model.named_parameters())
    for task in tasks:
        changed = any(
            not torch.equal(before[n], after[n])
            for n, _ in model.named_parameters()
            if n.startswith(f"heads.{task}.")
        )
        assert changed == (task == "semseg"), task
    for index, policy in enumerate(model.policies):
        for name in ("block_out", "token_out"):
            key = f"policies.{index}.{name}.weight"
            old = before[key].view(policy.depth, num_tasks, policy.hidden)
            new = after[key].detach().view(policy.depth, num_tasks, policy.hidden)
            for task in range(num_tasks):
                same = torch.equal(old[:, task], new[:, task])
                assert same == (task != focus), (key, task)


def test_frozen_slices_restore_other_rows():
    torch.manual_seed(0)
    model = AdaMTL(get_preset("tiny"))
    frozen = FrozenPolicySlices(model, focus=1)
    layer = model.policies[0].token_out
    with torch.no_grad():
        layer.weight.add_(1.0)
    frozen.restore()
    rows = layer.weight.detach().view(model.policies[0].depth, 4, -1)
    moved = [bool((rows[:, t] > 0.5).any()) for t in range(4)]
    assert moved == [False, True, False, False]


def test_efficiency_loss_lowers_flops(data_root, batch, tmp_path):
    init = fresh_checkpoint(tmp_path / "init.safetensors")
    start, _ = load_checkpoint(init)
    _, _, ratio_before = mask_means(start, batch["image"], 0.3)
    assert ratio_before > 0.8

    args = parse(
        data_root, tmp_path, "--stage", "cotrain", "--init", str(init), "--setting", "L",
        "--att-epochs", "0", "--finetune-epochs", "3", "--steps-per-epoch", "4",
        "--policy-lr", "0.05", "--alpha", "5", "--calibration-step", "0.3",
        "--calibration-tolerance", "0.05",
    )  # fmt: skip
    trained, _ = load_checkpoint(main(args))
    _, _, ratio_after = mask_means(trained, batch["image"], 0.3)
    assert ratio_after < ratio_before - 0.2, (ratio_before, ratio_after)

    records = [
        json.loads(line)
        for line in (tmp_path / "cotrain" / "metrics.jsonl").read_text().splitlines()
    ]
    assert records[-1]["flops_ratio"] < records[0]["flops_ratio"]
    assert all(r["budget"] == pytest.approx(0.3) for r in records)
    assert trained.calibration is not None
    assert trained.calibration["budgets"] == pytest.approx([0.3, 0.6, 0.9])


def test_latency_split_targets_and_loss_terms(data_root, tmp_path):
    model, _ = load_checkpoint(fresh_checkpoint(tmp_path / "init.safetensors"))
    depths = model.config.depths
    stage_of_block = [stage for stage, depth in enumerate(depths) for _ in range(depth)]
    latency = parse(data_root, tmp_path, "--stage", "cotrain", "--budget-split", "latency")
    budget, blocks, tokens = draw_budget(latency, model.config, torch.Generator().manual_seed(3))
    assert model.config.min_budget <= budget < 1.0
    # Every block's two targets multiply to the budget; the first stage keeps all its blocks
    # and cuts tokens, the last cuts blocks more than tokens.
    torch.testing.assert_close(blocks * tokens, torch.full_like(blocks, budget))
    assert blocks[0] == 1.0
    assert tokens[0] == pytest.approx(budget)
    assert blocks[-1] < tokens[-1]
    weights, groups = efficiency_terms(latency, model)
    assert weights == [1.0] * sum(depths)
    assert groups == stage_of_block

    uniform = parse(data_root, tmp_path, "--stage", "cotrain")
    budget, blocks, tokens = draw_budget(uniform, model.config, torch.Generator().manual_seed(3))
    assert torch.allclose(blocks, blocks[0])
    assert torch.allclose(tokens, tokens[0])
    weights, groups = efficiency_terms(uniform, model)
    widths = [float(model.config.embed_dim * 2**stage) for stage in stage_of_block]
    assert weights == widths
    assert groups is None


def test_latency_split_moves_the_cut(data_root, batch, tmp_path):
    """Trained with the latency split, the first stage cuts tokens and the last cuts blocks."""
    init = fresh_checkpoint(tmp_path / "init.safetensors")
    args = parse(
        data_root, tmp_path, "--stage", "cotrain", "--init", str(init), "--budget-split",
        "latency", "--att-epochs", "0", "--finetune-epochs", "3", "--steps-per-epoch", "6",
        "--policy-lr", "0.05", "--alpha", "5", "--budget-sampling", "low",
        "--calibration-step", "0.35", "--calibration-tolerance", "0.05",
    )  # fmt: skip
    trained, _ = load_checkpoint(main(args))
    # The policy's own split, without the calibrated offset, through the training gates.
    trained.calibration = None
    trained.train()
    with torch.no_grad():
        stats = trained(
            batch["image"], 0.4, generator=torch.Generator().manual_seed(5), compute_outputs=False
        ).stats
    blocks = stats.block_keep.mean(dim=0)
    tokens = stats.token_keep.mean(dim=0)
    first, last = slice(0, 2), slice(-2, None)
    assert float(blocks[first].min()) > 0.9, blocks
    assert float(blocks[first].mean()) > float(blocks[last].mean()), blocks
    assert float(tokens[first].mean()) < float(tokens[last].mean()), tokens


def test_cotrain_distils_the_static_model(data_root, batch, tmp_path):
    init = fresh_checkpoint(tmp_path / "init.safetensors")
    args = parse(
        data_root, tmp_path, "--stage", "cotrain", "--init", str(init), "--distill", "2",
        "--att-epochs", "0", "--finetune-epochs", "1", "--steps-per-epoch", "2",
        "--calibration-step", "0.3", "--calibration-tolerance", "0.05",
    )  # fmt: skip
    teacher, _ = load_checkpoint(init)
    teacher.eval()
    student, _ = load_checkpoint(init)
    plain = prepare_epoch(student, args, 0, DistributedContext())
    distilled = prepare_epoch(student, args, 0, DistributedContext(), teacher=teacher)
    without = plain.loss_function(student, batch)
    result = distilled.loss_function(student, batch)
    tasks = list(student.config.tasks)
    assert sorted(result.terms) == sorted([*tasks, "efficiency", *(f"distill_{t}" for t in tasks)])
    # Same budget draw and noise seeds, so the only difference is the distillation term.
    distill = sum(
        DEFAULT_TASK_WEIGHTS[t] * float(result.terms[f"distill_{t}"].detach()) for t in tasks
    )
    assert distill > 0
    expected = float(without.loss.detach()) + 2 * distill
    assert float(result.loss.detach()) == pytest.approx(expected, rel=1e-4)
    result.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())

    trained, metadata = load_checkpoint(main(args))
    assert metadata["provenance"]["schedule"]["distill"] == 2
    record = json.loads((tmp_path / "cotrain" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["distill_semseg"] > 0


def test_bf16_autocasts_forward_pass_only(data_root, batch, tmp_path):
    init = fresh_checkpoint(tmp_path / "init.safetensors")
    args = parse(
        data_root, tmp_path, "--stage", "cotrain", "--init", str(init), "--precision", "bf16",
        "--att-epochs", "0", "--finetune-epochs", "1",
    )  # fmt: skip
    model, _ = load_checkpoint(init)
    cpu = torch.device("cpu")
    plain = prepare_epoch(model, args, 0, DistributedContext())
    assert with_precision(plain.loss_function, "fp32", cpu) is plain.loss_function
    # A second plan of the same epoch draws the same budget and gate noise.
    second = prepare_epoch(model, args, 0, DistributedContext())
    step = with_precision(second.loss_function, args.precision, cpu)
    linear = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))
    dtypes = []
    handle = linear.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype)
    )
    try:
        half = step(model, batch)
    finally:
        handle.remove()
    assert dtypes, "the encoder's first linear layer did not run"
    assert set(dtypes) == {torch.bfloat16}
    assert half.loss.dtype == torch.float32
    assert all(term.dtype == torch.float32 for term in half.terms.values())
    full = plain.loss_function(model, batch)
    assert float(half.loss.detach()) == pytest.approx(float(full.loss.detach()), rel=0.05)

    half.loss.backward()
    for policy in model.policies:
        for parameter in (policy.block_out.weight, policy.token_out.weight):
            assert parameter.grad is not None
            assert parameter.grad.dtype == torch.float32
            assert float(parameter.grad.abs().sum()) > 0


def _cotrain_command(data_root, init, out):
    return [
        sys.executable, "-m", "training.train", "--stage", "cotrain", "--init", str(init),
        "--data", str(data_root), "--out", str(out), "--calibration-images", "4",
        "--batch-size", "4", "--threads", "1", "--att-epochs", "2", "--finetune-epochs", "2",
        "--steps-per-epoch", "3", "--warmup-steps", "1", "--calibration-step", "0.3",
        "--calibration-tolerance", "0.05",
    ]  # fmt: skip


def test_resume_after_kill_matches_uninterrupted(data_root, tmp_path):
    init = fresh_checkpoint(tmp_path / "init.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        _cotrain_command(data_root, init, tmp_path / "a"), cwd=REPO, env=env, check=True,
        capture_output=True, timeout=240,
    )  # fmt: skip

    out = tmp_path / "b"
    state = out / "cotrain" / "state.pt"
    process = subprocess.Popen(
        _cotrain_command(data_root, init, out), cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (out / "cotrain" / "model.safetensors").exists()
    assert torch.load(state, weights_only=True)["epoch"] < 4

    resumed = subprocess.run(
        _cotrain_command(data_root, init, out), cwd=REPO, env=env, check=True,
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert "resumed cotrain" in resumed.stderr

    first = load_file(str(tmp_path / "a" / "cotrain" / "model.safetensors"))
    second = load_file(str(out / "cotrain" / "model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    _, meta_a = load_checkpoint(tmp_path / "a" / "cotrain" / "model.safetensors")
    _, meta_b = load_checkpoint(out / "cotrain" / "model.safetensors")
    assert meta_a["calibration"] == meta_b["calibration"]


def test_budget_sampling_low_favours_low_budgets():
    config = get_preset("tiny")
    low = config.min_budget
    draws = {}
    for sampling in ("uniform", "low"):
        generator = torch.Generator().manual_seed(0)
        draws[sampling] = torch.tensor(
            [sample_budget(config, generator, sampling) for _ in range(4000)]
        )
    quarter = low + 0.25 * (1.0 - low)
    for values in draws.values():
        assert float(values.min()) >= low
        assert float(values.max()) < 1.0
    # P(u^2 < 1/4) = 1/2 against 1/4 for uniform draws.
    assert abs(float((draws["uniform"] < quarter).float().mean()) - 0.25) < 0.03
    assert abs(float((draws["low"] < quarter).float().mean()) - 0.5) < 0.03
    with pytest.raises(ValueError, match="invalid budget sampling 'high'"):
        sample_budget(config, torch.Generator(), "high")
