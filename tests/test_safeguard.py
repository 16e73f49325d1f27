"""Relative damping, the update safeguard and the pruning subset of the training split."""

from __future__ import annotations

import json
import types

import pytest
import torch
from test_woodfisher import FixedSampler
from torch import nn
from torch.utils.data import Dataset, TensorDataset
from wfcore.plugins.diag_fisher import DiagFisher, DiagFisherOptions
from wfcore.plugins.kfac import kron_damp
from wfcore.plugins.magnitude import IdentityCurvature
from wfcore.plugins.woodfisher import WoodFisher, WoodFisherOptions, fisher_scale

from wfcore import cli, hookimpl, manager
from wfcore import config as config_mod
from wfcore.fisher.store import GradientStore
from wfcore.interfaces import DataBundle, PruningProblem
from wfcore.run import pipeline
from wfcore.run.safeguard import Safeguard, calibration_batch

# (m, d) = (2, 3): diag(G^T G / m) = [(1 + 9) / 2, 0, 4 / 2] = [5, 0, 2]; the middle
# weight is dead (pruned), so the mean over live weights is (5 + 2) / 2 = 3.5.
G_HAND = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]], dtype=torch.float64)


def fit_woodfisher(G: torch.Tensor, **options):
    problem = PruningProblem(None, None, None, FixedSampler(G, {"x": (G.shape[1],)}), None,
                             torch.device("cpu")).with_gradients()
    return WoodFisher(WoodFisherOptions(block_size="full", **options)).fit(problem)


def test_relative_damp_equals_the_absolute_damp_it_names():
    assert fisher_scale(GradientStore.from_tensor(G_HAND)) == pytest.approx(3.5, rel=1e-15)
    relative = fit_woodfisher(G_HAND, damp=0.1, damp_mode="relative")
    absolute = fit_woodfisher(G_HAND, damp=0.35, damp_mode="absolute")
    assert relative.damping() == pytest.approx(0.35, rel=1e-15)
    torch.testing.assert_close(relative.inverse_diagonal()["x"],
                               absolute.inverse_diagonal()["x"], rtol=1e-13, atol=0)
    # and the Fisher it inverts is 0.35 I + G^T G / m
    F = 0.35 * torch.eye(3, dtype=torch.float64) + G_HAND.T @ G_HAND / 2
    torch.testing.assert_close(relative.inverse_diagonal()["x"],
                               torch.linalg.inv(F).diagonal(), rtol=1e-12, atol=0)


def test_relative_damp_is_one_scale_for_all_blocks():
    """Blocks of very different gradient scale get one lambda (scores stay comparable)."""
    G = torch.cat([torch.randn(20, 5, dtype=torch.float64),
                   1e-3 * torch.randn(20, 5, dtype=torch.float64)], dim=1)
    problem = PruningProblem(None, None, None, FixedSampler(G, {"x": (10,)}), None,
                             "cpu").with_gradients()
    cur = WoodFisher(WoodFisherOptions(block_size=5, damp=0.5)).fit(problem)
    damps = torch.cat([g.damp for _, g in cur.groups()])
    assert torch.all(damps == damps[0])
    assert float(damps[0]) == pytest.approx(0.5 * float(G.square().mean()), rel=1e-12)


def test_kfac_and_diag_fisher_relative_damp_by_hand():
    A, G = torch.diag(torch.tensor([1.0, 3.0])), torch.diag(torch.tensor([2.0, 4.0]))
    # mean of diag(A (x) G) = mean(diag A) * mean(diag G) = 2 * 3
    assert kron_damp({"w": (A, G)}, 0.5, "relative") == pytest.approx(3.0)
    assert kron_damp({"w": (A, G)}, 0.5, "absolute") == 0.5
    problem = PruningProblem(None, None, None, FixedSampler(G_HAND.float(), {"x": (3,)}),
                             None, "cpu").with_gradients()
    cur = DiagFisher(DiagFisherOptions(damp=0.1, damp_mode="relative")).fit(problem)
    assert cur.damping() == pytest.approx(0.35)
    torch.testing.assert_close(cur.inverse_diagonal()["x"].double(),
                               1 / (torch.tensor([5.0, 0.0, 2.0], dtype=torch.float64) + 0.35))


def tiny_model(seed: int = 0) -> tuple[nn.Module, dict[str, nn.Parameter], TensorDataset]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 6)
    data = TensorDataset(x, model(x).argmax(1).detach())
    return model, {n: p for n, p in model.named_parameters() if n.endswith("weight")}, data


@pytest.mark.parametrize("labels", ["empirical", "sampled"])
@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0, 30.0, float("nan")])
def test_safeguard_never_above_update_none(labels, scale):
    model, params, data = tiny_model()
    guard = Safeguard(model, params, calibration_batch(data, 32, seed=0), labels=labels,
                      alphas=[1.0, 0.5, 0.25])
    teacher = torch.softmax(guard.logits(), -1)
    weights = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(1)
    keep = {n: torch.rand(p.shape, generator=g) > 0.6 for n, p in params.items()}
    update = {n: scale * torch.randn(p.shape, generator=g) for n, p in params.items()}
    for n in update:  # an OBS update zeroes what it prunes
        update[n] = torch.where(keep[n], update[n], -weights[n])
    chosen, kept, record = guard.choose(weights, update, keep, IdentityCurvature(weights), None)
    assert kept is keep  # no magnitude fallback offered
    for n, p in params.items():  # choose leaves the model as it came
        assert torch.equal(p, weights[n])

    def loss_after(change):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n] + (change[n] if change is not None else 0.0))
                p.mul_(keep[n])
        out = guard.loss(teacher)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
        return out

    none = loss_after(None)
    if scale == 0.0:  # an update that moves no kept weight: nothing to choose, nothing run
        assert chosen is None and record["skipped"] and record["actual_increase"] is None
        return
    assert loss_after(chosen) <= none
    assert record["actual_increase"] == pytest.approx(loss_after(chosen) - guard.loss(teacher))
    assert record["alpha"] in (1.0, 0.5, 0.25, 0.0)
    if scale != scale:  # a non-finite update is never chosen
        assert chosen is None and record["alpha"] == 0.0


def test_safeguard_falls_back_to_the_magnitude_mask_when_it_is_better():
    """Scores that prune the largest weights lose to magnitude's mask on the calibration
    batch; the step takes magnitude's mask, without the update."""
    model, params, data = tiny_model()
    guard = Safeguard(model, params, calibration_batch(data, 64, seed=0), alphas=[1.0])
    weights = {n: p.detach().clone() for n, p in params.items()}
    keep_small = {n: w.abs() < w.abs().flatten().kthvalue(w.numel() // 2).values
                  for n, w in weights.items()}  # prunes the largest half
    keep_large = {n: ~k for n, k in keep_small.items()}
    update = {n: torch.where(keep_small[n], 0.01 * torch.ones_like(w), -w)
              for n, w in weights.items()}
    chosen, kept, record = guard.choose(weights, update, keep_small, IdentityCurvature(weights),
                                        None, magnitude_keep=lambda: keep_large)
    assert record["mask"] == "magnitude" and chosen is None and kept is keep_large
    assert record["actual_increase"] == min(t["increase"] for t in record["tried"])
    off = Safeguard(model, params, guard.batch, alphas=[1.0], fallback=False)
    _, kept, record = off.choose(weights, update, keep_small, IdentityCurvature(weights), None,
                                 magnitude_keep=lambda: keep_large)
    assert kept is keep_small and record["mask"] == "scores"


class Watched(Dataset):
    """A data set that counts every read."""

    def __init__(self, inner: Dataset):
        self.inner, self.reads = inner, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        return self.inner[i]


def watched_data_plugin(bundles: list[DataBundle]):
    """A data set plugin 'watched': train inputs are >= 0, test inputs < 0."""
    def factory(options, data) -> DataBundle:
        g = torch.Generator().manual_seed(0)
        train = TensorDataset(torch.rand(200, 1, 4, 4, generator=g),
                              torch.randint(0, 3, (200,), generator=g))
        test = Watched(TensorDataset(-1 - torch.rand(50, 1, 4, 4, generator=g),
                                     torch.randint(0, 3, (50,), generator=g)))
        bundles.append(DataBundle(train, test, num_classes=3, input_shape=(1, 4, 4)))
        return bundles[-1]

    return types.SimpleNamespace(wfcore_datasets=hookimpl(lambda: {"watched": factory}))


@pytest.mark.parametrize("fraction", [1.0, 0.1])
def test_calibration_batch_and_gradients_never_touch_the_test_set(tmp_path, fraction):
    bundles: list[DataBundle] = []
    plugins = manager.build(extra_plugins=[("watched", watched_data_plugin(bundles))])
    cfg = config_mod.load(None, [
        "data.name=watched", "model.name=mlpnet", "train.epochs=1", "fisher.num_grads=30",
        "estimator.name=woodfisher", "scorer.update=joint", f"data.train_fraction={fraction}",
        "safeguard.calibration_samples=500", f"output={tmp_path}", "device=cpu",
        f"cache_dir={tmp_path / 'cache'}"])
    setup = pipeline.set_up(cfg, plugins, pipeline.build_components(cfg, plugins), tmp_path)
    pruning = pipeline.Pruning(setup)
    test = bundles[-1].test
    batch = pruning.safeguard.batch
    assert bool((batch.x >= 0).all())  # every calibration sample is a training sample
    expected = 200 if fraction == 1.0 else 20
    assert len(batch.x) == expected == setup.pool_record["samples"]
    train_x, pool = bundles[-1].train.tensors[0], pruning.sampler.dataset
    for i, x in zip(batch.indices.tolist(), batch.x, strict=True):  # drawn from the pool
        original = pool.indices[i] if fraction < 1.0 else i
        assert torch.equal(train_x[original], x)
    result = pruning.prune_to(0.5)
    record = result.record
    assert set(result.timings) == {"gradients", "estimate", "prune"}
    assert record["mask"] in ("scores", "magnitude")
    assert test.reads == 0  # pruning (gradients, calibration, safeguard) never read it
    assert {"damp", "alpha", "predicted_increase", "actual_increase"} <= set(record)
    assert record["predicted_increase"] is not None and record["damp"] > 0


def test_report_records_safeguard_and_pruning_data(tmp_path):
    out = tmp_path / "run"
    code = cli.main(["-q", "prune", "configs/mnist_mlpnet.yaml", "scheduler.name=iterative",
                     "scheduler.steps=2", "scheduler.sparsities=[0.9]", "fisher.num_grads=100",
                     "data.train_fraction=0.05", f"output={out}"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruning_data"] == {"train_fraction": 0.05, "samples": 200, "of": 4000,
                                      "seed": 0, "finetune": "all",
                                      "batchnorm": {"enabled": False, "modules": 0,
                                                    "samples": 0, "calls": 0, "seconds": 0.0}}
    records = report["steps"][0]["safeguard"]
    assert [r["target_sparsity"] for r in records] == pytest.approx([0.7875, 0.9])
    for r in records:
        assert r["alpha"] in (1.0, 0.75, 0.5, 0.25, 0.0) and r["damp"] > 0
        assert r["predicted_increase"] >= 0
        finalists = [t for t in r["tried"] if t["samples"] == 200]  # judged on all
        assert r["actual_increase"] == min(t["increase"] for t in finalists)
    md = (out / "report.md").read_text()
    assert "## Update safeguard" in md and "200 of 4000 training samples" in md


@pytest.mark.parametrize("override, key", [("data.train_fraction=0", "data.train_fraction"),
                                           ("safeguard.alphas=[1.5]", "safeguard.alphas"),
                                           ("estimator.damp_mode=huge", "estimator")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(Exception, match=key):
        cfg = config_mod.load("configs/mnist_mlpnet.yaml", [override])
        pipeline.build_components(cfg, manager.build())


def test_screening_drops_clearly_worse_candidates_on_fewer_samples():
    """With ``screen`` samples, a candidate far worse than the best is judged on those
    alone; the close ones on all of them. The choice equals the one without screening."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(512, 6)
    data = TensorDataset(x, model(x).argmax(1).detach())
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    weights = {n: p.detach().clone() for n, p in params.items()}
    keep = {n: w.abs() > w.abs().flatten().kthvalue(w.numel() // 4).values
            for n, w in weights.items()}
    g = torch.Generator().manual_seed(3)
    update = {n: torch.where(keep[n], 5.0 * torch.randn(w.shape, generator=g), -w)
              for n, w in weights.items()}  # a wild update: alpha 1 is far worse
    batch = calibration_batch(data, 512, seed=0)
    screened = Safeguard(model, params, batch, alphas=[1.0, 0.5, 0.25], screen=128)
    full = Safeguard(model, params, batch, alphas=[1.0, 0.5, 0.25])
    curvature = IdentityCurvature(weights)
    _, _, a = screened.choose(weights, update, keep, curvature, None)
    _, _, b = full.choose(weights, update, keep, curvature, None)
    assert a["alpha"] == b["alpha"] == 0.0
    samples = {t["alpha"]: t["samples"] for t in a["tried"]}
    assert samples[1.0] == 128  # dropped after the screening
    assert a["forward_samples"] < b["forward_samples"] == 512 * 5
    if samples[0.0] == 512:  # a finalist: judged on all, like the run without screening
        assert a["actual_increase"] == pytest.approx(b["actual_increase"], rel=1e-12)
