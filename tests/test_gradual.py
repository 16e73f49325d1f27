"""The gradual scheduler: the polynomial schedule, its plan, and masked fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from wfcore.plugins.gradual import Gradual, GradualOptions, polynomial_sparsity

from wfcore import config, manager
from wfcore.errors import ConfigError
from wfcore.masks import Masks
from wfcore.run import pipeline

ROOT = Path(__file__).parents[1]
# The gradual config with MLPNet instead of the CNN and 1,000 training images: the same
# schedule keys, fast epochs.
GRADUAL = ROOT / "configs" / "mnist_cnn_gradual.yaml"
MLPNET = ["model.name=mlpnet", "train.epochs=10", "data.options.test_size=4000"]


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_sparsity(t: int, t0: int, t1: int, s_i: float, s_f: float, p: float) -> float:
    """s(t) = s_f - (s_f - s_i)(1 - (t - t0)/(t1 - t0))^p in exact rational arithmetic."""
    from fractions import Fraction

    frac = Fraction(t - t0, t1 - t0)
    return float(Fraction(s_f) - (Fraction(s_f) - Fraction(s_i)) * (1 - frac) ** int(p))


def test_polynomial_schedule_matches_the_formula():
    for t in range(1, 37):
        got = polynomial_sparsity(t, 1, 36, 0.05, 0.9, 3)
        assert got == pytest.approx(reference_sparsity(t, 1, 36, 0.05, 0.9, 3), abs=1e-12)
    assert polynomial_sparsity(1, 1, 36, 0.05, 0.9) == pytest.approx(0.05)
    assert polynomial_sparsity(36, 1, 36, 0.05, 0.9) == pytest.approx(0.9)
    assert polynomial_sparsity(80, 1, 36, 0.05, 0.9) == pytest.approx(0.9)  # clamped after t1


def test_paper_plan_prunes_at_1_6_to_36_and_fine_tunes_to_the_end():
    options = GradualOptions(initial_sparsity=0.05, final_sparsity=0.9, start_epoch=1,
                             end_epoch=36, freq=5, epochs=100)
    plan = Gradual(options).plan()
    assert [s.epoch for s in plan] == [1, 6, 11, 16, 21, 26, 31, 36]
    assert [s.index for s in plan] == list(range(8))
    targets = [s.target_sparsity for s in plan]
    assert targets[0] == pytest.approx(0.05) and targets[-1] == pytest.approx(0.9)
    assert all(b > a for a, b in zip(targets, targets[1:], strict=False))
    # The increments shrink: the cubic prunes fast first, slowly near the target.
    increments = [b - a for a, b in zip(targets, targets[1:], strict=False)]
    assert all(b < a for a, b in zip(increments, increments[1:], strict=False))
    assert [s.finetune_epochs for s in plan] == [5] * 7 + [64]
    assert not any(s.from_dense for s in plan)
    # Steps tile the epochs from t0 to the end without gaps.
    for step, following in zip(plan, plan[1:], strict=False):
        assert step.epoch + step.finetune_epochs == following.epoch
    assert plan[-1].epoch + plan[-1].finetune_epochs == 100


def test_zero_initial_sparsity_skips_the_empty_step_and_substeps_interpolate():
    options = GradualOptions(initial_sparsity=0.0, final_sparsity=0.8, start_epoch=0,
                             end_epoch=4, freq=2, epochs=6, substeps=2)
    plan = Gradual(options).plan()
    assert [s.epoch for s in plan] == [2, 4]  # nothing to prune at t0 when s_i = 0
    first, last = plan
    s2 = reference_sparsity(2, 0, 4, 0.0, 0.8, 3)
    assert first.substeps == pytest.approx([s2 / 2, s2])
    assert last.substeps == pytest.approx([s2 + (0.8 - s2) / 2, 0.8])
    assert last.finetune_epochs == 2


@pytest.mark.parametrize("override, key", [
    ("scheduler.end_epoch=5", "multiple of freq"),
    ("scheduler.final_sparsity=1.0", "final_sparsity"),
    ("scheduler.epochs=4", "end_epoch"),
    ("scheduler.lr_schedule=linear", "lr_schedule"),
])
def test_bad_options_are_config_errors(override, key):
    cfg = config.load(GRADUAL, [*MLPNET, "scheduler.start_epoch=0", "scheduler.end_epoch=4",
                                "scheduler.freq=2", "scheduler.epochs=6", override])
    with pytest.raises(ConfigError, match=key) as err:
        pipeline.instantiate(cfg, "scheduler", manager.build())
    assert str(err.value).startswith("scheduler")


def gradual_overrides(out: Path) -> list[str]:
    return ["estimator.name=magnitude", "scorer.update=none", "scheduler.initial_sparsity=0.5",
            "scheduler.final_sparsity=0.9", "scheduler.start_epoch=0", "scheduler.end_epoch=2",
            "scheduler.freq=1", "scheduler.epochs=4", "scheduler.lr=0.01",
            "scheduler.lr_decay_start=0", f"output={out}"]


def test_pruned_weights_stay_exactly_zero_after_every_optimizer_step(tmp_path, monkeypatch):
    """Checked from a global optimizer hook, which runs after the masks' own step hook."""
    active: list[Masks] = []
    attach, detach = Masks.attach, Masks.detach

    def tracking_attach(self, optimizer):
        attach(self, optimizer)
        active.append(self)

    def tracking_detach(self):
        detach(self)
        if self in active:
            active.remove(self)

    monkeypatch.setattr(Masks, "attach", tracking_attach)
    monkeypatch.setattr(Masks, "detach", tracking_detach)
    checked = {"steps": 0, "pruned": 0}

    def check(optimizer, args, kwargs):
        for masks in active:
            for name, p in masks.params.items():
                pruned = ~masks.keep[name]
                assert torch.all(p.detach()[pruned] == 0), f"{name}: pruned weight moved"
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:  # no momentum left to revive a pruned weight
                    assert torch.all(buf[pruned] == 0), f"{name}: momentum of a pruned weight"
                checked["pruned"] += int(pruned.sum())
            checked["steps"] += 1

    handle = register_optimizer_step_post_hook(check)
    try:
        out = tmp_path / "run"
        cfg = config.load(GRADUAL, MLPNET + gradual_overrides(out))
        report = pipeline.run(cfg)
    finally:
        handle.remove()
    assert checked["steps"] == 4 * 16  # every optimizer step of the 4 epochs was checked
    assert checked["pruned"] > 0
    assert [round(s["sparsity"], 3) for s in report["steps"]] == [0.5, 0.85, 0.9]
    state = torch.load(out / "model_step2.pt", weights_only=True)
    zeros = sum(int((state[n] == 0).sum()) for n in report["steps"][-1]["layers"])
    assert zeros >= round(0.9 * report["dense"]["prunable"])


def test_report_has_per_epoch_records_and_plot(tmp_path):
    out = tmp_path / "run"
    pipeline.run(config.load(GRADUAL, MLPNET + gradual_overrides(out)))
    report = json.loads((out / "report.json").read_text())
    epochs = report["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert [e["step"] for e in epochs] == [0, 1, 2, 2]
    for e in epochs:
        assert set(e) >= {"epoch", "step", "lr", "train_loss", "accuracy", "loss", "sparsity"}
    assert epochs[0]["lr"] == pytest.approx(0.01)  # scheduler.lr overrides train.lr
    assert epochs[-1]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert [s["epoch"] for s in report["steps"]] == [1, 2, 4]
    assert report["finished"] and (out / "epochs.png").is_file()
    assert not (out / "checkpoint.pt").exists()  # a finished run keeps no checkpoint


RESNET50 = ROOT / "configs" / "resnet50_imagenet_gradual.yaml"


def test_resnet50_config_plans_the_paper_schedule():
    cfg = config.load(RESNET50)
    plugins = manager.build()
    plan = pipeline.instantiate(cfg, "scheduler", plugins).plan()
    assert [s.epoch for s in plan] == [1, 6, 11, 16, 21, 26, 31, 36]
    assert plan[-1].target_sparsity == pytest.approx(0.9)
    assert plan[-1].epoch + plan[-1].finetune_epochs == 100
    for section in ("scorer", "allocator"):
        pipeline.instantiate(cfg, section, plugins)
    if "woodfisher" in plugins.registry("estimators").names():
        pipeline.instantiate(cfg, "estimator", plugins)  # damp, block_size are its options


@pytest.mark.slow
def test_resnet50_config_runs_a_few_steps_on_fake_data(tmp_path):
    """The ImageNet config end to end on a few tiny random images, magnitude for speed."""
    cfg = config.load(RESNET50, [
        "model.checkpoint=null", "train.epochs=1", "data.name=fake", "data.root=null",
        "data.options.image_size=[3,32,32]", "data.options.train_size=4",
        "data.options.test_size=2", "data.options.num_classes=10", "data.batch_size=4",
        "data.num_workers=0", "scheduler.end_epoch=2", "scheduler.freq=1", "scheduler.epochs=3",
        "scheduler.lr_decay_start=1", f"output={tmp_path / 'run'}"])
    cfg.estimator = {"name": "magnitude"}
    report = pipeline.run(cfg)
    assert [round(s["sparsity"], 4) for s in report["steps"]] == [0.05, 0.9]
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3]
    assert report["epochs"][2]["lr"] == pytest.approx(0.005 * 0.918)  # decays after epoch 1
