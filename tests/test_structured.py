"""structure.unit: channel: group OBS against explicit float64 inverses, the shrunk model
against the masked one, and residual additions keeping their tied channels together."""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import onnx
import pytest
import reference
import torch
from test_resume import interrupt_epoch
from wfcore.export.onnx import torch_to_onnx
from wfcore.plugins.architectures import ResidualBNCNN, TinyMobileNet

from wfcore import config
from wfcore.channels import channel_groups, coordinates, shrink
from wfcore.errors import ConfigError, WfcoreError
from wfcore.fisher.gradients import ParamLayout
from wfcore.group_obs import Diagonal, DualFisher, Random, Taylor
from wfcore.masks import select_params
from wfcore.run import pipeline
from wfcore.run.saved import export_run
from wfcore.structured import (
    CostModel,
    chunks,
    prunable_groups,
    prune_channels,
    recalibrate_batchnorm,
)

pytest.importorskip("torch_pruning")

EXAMPLE = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))


def tiny_model(width: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ResidualBNCNN(1, 10, width)
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(3):
            model(torch.randn(8, 1, 12, 12) * 2 + 0.5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def channel_sets(model: torch.nn.Module, params) -> tuple[list, ParamLayout]:
    _, groups = prunable_groups(model, EXAMPLE)
    layout = ParamLayout(params)
    return [coordinates(g, model, layout.offsets) for g in groups], layout


@pytest.mark.parametrize("m", [30, 400])  # Woodbury (|G| > m) and direct (|G| <= m) solves
def test_group_obs_score_and_update_match_explicit_inverse(m):
    model = tiny_model()
    params = select_params(model, None)
    coords, layout = channel_sets(model, params)
    w = layout.flatten({n: p.detach() for n, p in params.items()}).double()
    G = torch.randn(m, layout.d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    damp = 0.05
    F_inv = reference.inverse(reference.fisher(G, damp))
    scorer = DualFisher(G, damp)
    sizes = set()
    for channels in coords:
        got = scorer.saliencies(w, channels)
        want = torch.stack([0.5 * w[i] @ torch.linalg.solve(F_inv[i][:, i], w[i])
                            for i in channels])
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
        sizes |= {i.numel() for i in channels}
    assert min(sizes) < m or max(sizes) > m
    # the joint update of two channels of two groups (coupled across layers)
    Q = torch.cat([coords[0][1], coords[-1][0]]).unique()
    removed = torch.zeros(layout.d, dtype=torch.bool)
    removed[Q] = True
    want = -F_inv[:, Q] @ torch.linalg.solve(F_inv[Q][:, Q], w[Q])
    got = scorer.update(w, removed)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert torch.equal(got[Q], -w[Q])  # removed weights land exactly on zero


def test_diagonal_taylor_random_scores():
    model = tiny_model()
    params = select_params(model, None)
    coords, layout = channel_sets(model, params)
    w = layout.flatten({n: p.detach() for n, p in params.items()}).double()
    inv = torch.rand(layout.d, dtype=torch.float64) + 0.1
    g = torch.randn(layout.d, dtype=torch.float64)
    channels = coords[0]
    # a diagonal F: [F^-1]_GG is diagonal, the group OBS score is a sum of single ones
    F_inv = torch.diag(inv)
    want = torch.stack([0.5 * w[i] @ torch.linalg.solve(F_inv[i][:, i], w[i]) for i in channels])
    torch.testing.assert_close(Diagonal(inv).saliencies(w, channels), want)
    torch.testing.assert_close(Diagonal().saliencies(w, channels),
                               torch.stack([0.5 * w[i].square().sum() for i in channels]))
    torch.testing.assert_close(Taylor(g).saliencies(w, channels),
                               torch.stack([(g[i] @ w[i]) ** 2 for i in channels]))
    r = Random(3).saliencies(w, channels)
    assert r.shape == (len(channels),) and torch.equal(r, Random(3).saliencies(w, channels))


def test_residual_addition_ties_both_sides():
    """The stem's channels are added to layer1's output: one group holds both, and
    removing from it shrinks both convs (pruning one alone would not run)."""
    model = tiny_model()
    _, groups = prunable_groups(model, EXAMPLE)
    tied = [g for g in groups if {"conv1", "layer1.conv2"} <=
            {i.module for i in g.items if i.kind == "out"}]
    assert len(tied) == 1
    assert {"layer1.conv1", "layer2.conv1", "layer2.shortcut.0"} <= \
        {i.module for i in tied[0].items if i.kind == "in"}
    assert all(set(i.roots.tolist()) == set(range(4)) for i in tied[0].items)
    g = groups.index(tied[0])
    graph, _ = prunable_groups(model, EXAMPLE)
    shrink(model, graph, channel_groups(model, graph), {})  # nothing removed: no change
    _, groups = prunable_groups(model, EXAMPLE)
    shrink(model, graph, groups, {g: [0, 2]})
    assert model.conv1.out_channels == model.layer1.conv2.out_channels == 2
    assert model.layer1.bn2.num_features == model.bn1.num_features == 2
    assert model.layer2.shortcut[0].in_channels == model.layer2.conv1.in_channels == 2
    assert model(EXAMPLE).shape == (2, 10)


@pytest.mark.parametrize("scorer", ["obs", "magnitude"])
def test_shrunk_model_equals_masked_model(scorer):
    model = tiny_model()
    params = select_params(model, None)
    d = ParamLayout(params).d
    G = torch.randn(40, d, generator=torch.Generator().manual_seed(2))
    score = DualFisher(G, 0.1) if scorer == "obs" else Diagonal()
    step = prune_channels(model, EXAMPLE, params, score, 0.5, shrink_model=False)
    masked_out = model(EXAMPLE)
    shrunk = copy.deepcopy(model)
    graph, groups = prunable_groups(shrunk, EXAMPLE)
    shrink(shrunk, graph, groups, step.allocation.removed)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(shrunk(EXAMPLE), masked_out, rtol=0, atol=1e-5)
    assert step.record()["predicted"]["flops_removed"] >= 0.5  # the target is reached


def test_depthwise_separable_model_shrinks_to_the_masked_model():
    torch.manual_seed(0)
    model = TinyMobileNet(1, 10, 4).eval()
    x = torch.randn(2, 1, 12, 12)
    step = prune_channels(model, x, select_params(model, None), Diagonal(), 0.5,
                          shrink_model=False)
    masked_out = model(x)
    graph, groups = prunable_groups(model, x)
    shrink(model, graph, groups, step.allocation.removed)
    torch.testing.assert_close(model(x), masked_out, rtol=0, atol=1e-5)
    counted = CostModel(model, x).total()
    assert counted == (step.allocation.after["macs"], step.allocation.after["params"])


def test_prune_channels_reaches_target_and_reports_both_metrics():
    model = tiny_model(8)
    params = select_params(model, None)
    before = sum(p.numel() for p in model.parameters())
    step = prune_channels(model, EXAMPLE, params, Diagonal(), 0.3, metric="params")
    record = step.record()
    assert record["counted"]["params_removed"] >= 0.3
    assert record["counted"]["flops_removed"] > 0
    torch.testing.assert_close(record["counted"]["params_removed"],
                               record["predicted"]["params_removed"])
    assert sum(p.numel() for p in model.parameters()) < before
    assert record["history"] and model(EXAMPLE).shape == (2, 10)
    recalibrate_batchnorm(model, [EXAMPLE])
    assert torch.isfinite(model(EXAMPLE)).all()


@pytest.mark.parametrize("round_to", [4, 8])
@pytest.mark.parametrize("metric", ["flops", "params"])
def test_round_to_keeps_multiples_and_still_reaches_the_target(round_to, metric):
    """Every layer keeps a multiple of round_to channels (or all: the groups too small
    to round), the target is still reached, and the exported model has the parameter
    count the report says."""
    model = tiny_model(12)  # groups of 12 and 24 channels: 12 is no multiple of 8
    x = EXAMPLE
    step = prune_channels(model, x, select_params(model, None), Diagonal(), 0.4,
                          metric=metric, round_to=round_to)
    record = step.record()
    assert record["round_to"] == round_to
    assert record["counted"][f"{metric}_removed"] >= 0.4
    assert record["channels_removed"] > 0
    for name in ("conv1", "layer1.conv1", "layer2.conv1"):
        conv = dict(model.named_modules())[name]
        dense = 12 if name != "layer2.conv1" else 24
        assert conv.out_channels % round_to == 0 or conv.out_channels == dense, name
    torch.testing.assert_close(record["counted"][f"{metric}_removed"],
                               record["predicted"][f"{metric}_removed"])
    path = torch_to_onnx(model.eval(), x, Path(tempfile.mkdtemp()) / "m.onnx")
    init = onnx.load(str(path)).graph.initializer
    # the report counts Conv/Linear weights and biases; the export folds each BatchNorm
    # into the conv before it (bias-free here), which gains one bias per channel
    norms = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert sum(math.prod(t.dims) for t in init) == record["counted"]["params"] + norms
    assert sum(math.prod(t.dims) for t in init if len(t.dims) > 1) == \
        sum(m.weight.numel() for m in model.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def test_chunks_remove_the_remainder_first_and_respect_the_floor():
    order = list(range(20))  # least salient first
    assert chunks(order, 20, 2, 8) == [order[:4], order[4:12]]  # keeps 16, then 8 (>= 2)
    assert chunks(order, 20, 9, 8) == [order[:4]]  # the floor 9 rounds up to 16
    assert chunks(order, 6, 1, 8) == []  # smaller than round_to: kept whole
    assert chunks(order[:6], 6, 1, 1) == [[c] for c in range(5)]


# -- in a run ---------------------------------------------------------------------------

GRADUAL = Path(__file__).parents[1] / "configs" / "mnist_cnn_gradual.yaml"


def structured_run(out: Path, *extra: str, resume: bool = False) -> dict:
    cfg = config.load(GRADUAL, [
        "model.name=bn_cnn", "model.options={width: 4}", "train.epochs=2",
        "data.options.test_size=4000", "estimator.name=woodfisher", "fisher.num_grads=32",
        "structure.unit=channel", "structure.round_to=1", "structure.recalibrate=256",
        "scorer.update=joint",
        "scheduler.initial_sparsity=0.3", "scheduler.final_sparsity=0.6",
        "scheduler.start_epoch=1", "scheduler.end_epoch=3", "scheduler.freq=1",
        "scheduler.epochs=4", "scheduler.lr=0.01", "scheduler.lr_decay_start=3",
        "export={name: onnx}", f"output={out}", *extra])
    return pipeline.run(cfg, resume=resume)


def resumed_like_whole(run, whole: dict, tmp_path: Path, monkeypatch) -> tuple[int, int]:
    """Interrupt ``run`` in epoch 3 (after its second structured step), resume it: the
    last step's state and every epoch's accuracy equal the uninterrupted ``whole``'s.
    Returns the numbers in the exported model's and the dense model's ONNX files."""
    out = tmp_path / "resumed"
    interrupt_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(out)
    monkeypatch.undo()
    resumed = run(out, resume=True)
    last = len(whole["steps"]) - 1
    a = torch.load(tmp_path / "whole" / f"model_step{last}.pt", weights_only=True)
    b = torch.load(out / f"model_step{last}.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["accuracy"] for e in whole["epochs"]] == [e["accuracy"] for e in resumed["epochs"]]
    return tuple(sum(math.prod(t.dims) for t in
                     onnx.load(str(tmp_path / "whole" / name)).graph.initializer)
                 for name in ("model.onnx", "dense.onnx"))


@pytest.mark.slow  # two gradual runs with fine-tuning (a minute or more on two cores)
@pytest.mark.usefixtures("one_thread")
def test_gradual_channel_run_shrinks_fine_tunes_resumes_and_exports(tmp_path, monkeypatch):
    """Fine-tuning runs on the shrunk model, the run directory's states rebuild their
    architecture (resume mid-epoch gives the same weights), the export is smaller."""
    whole = structured_run(tmp_path / "whole")
    flops = [s["safeguard"][0]["structured"]["counted"]["flops_removed_from_dense"]
             for s in whole["steps"]]
    assert flops == sorted(flops) and flops[-1] >= 0.6
    assert [s["target_sparsity"] for s in whole["steps"]][-1] == 0.6
    numel, dense = resumed_like_whole(structured_run, whole, tmp_path, monkeypatch)
    assert numel < 0.6 * dense
    assert whole["export"]["parity"]["max_abs_diff"] < 1e-4
    # a state of an earlier step rebuilds its own architecture (wfcore export RUN --step 0)
    result = export_run(tmp_path / "whole", step=0, output=tmp_path / "step0.onnx")
    assert result["sparse"]["parity"]["max_abs_diff"] < 1e-4


def test_reading_coordinates_are_the_next_layers_inputs():
    model = tiny_model()
    params = select_params(model, None)
    layout = ParamLayout(params)
    _, groups = prunable_groups(model, EXAMPLE)
    stem = next(g for g in groups if g.root == "conv1")
    every = coordinates(stem, model, layout.offsets)
    reads = coordinates(stem, model, layout.offsets, DualFisher.reads)
    conv1 = set(range(layout.offsets["conv1.weight"],
                      layout.offsets["conv1.weight"] + layout.numels["conv1.weight"]))
    for a, r in zip(every, reads, strict=True):
        assert set(r.tolist()) < set(a.tolist()) and not conv1 & set(r.tolist())
    # layer1.conv1, layer2.conv1 and the shortcut read channel c: 4*9 + 8*9 + 8 weights
    assert all(r.numel() == 4 * 9 + 8 * 9 + 8 for r in reads)


def test_torch_pruning_scores_scores_every_group_and_enters_a_step():
    from wfcore.group_obs import Precomputed
    from wfcore.structured import torch_pruning_scores

    model = tiny_model()
    _, groups = prunable_groups(model, EXAMPLE)
    scores = torch_pruning_scores(model, EXAMPLE)
    assert [s.numel() for s in scores] == [g.size for g in groups]
    # a channel whose every weight in the group is zero scores lowest in its group
    params = select_params(model, None)
    sets, layout = channel_sets(model, params)
    with torch.no_grad():
        w = layout.flatten({n: p.detach() for n, p in params.items()})
        w[sets[0][1]] = 0.0
        for n, t in layout.unflatten(w).items():
            params[n].copy_(t)
    zeroed = torch_pruning_scores(model, EXAMPLE)[0]
    assert float(zeroed[1]) < float(torch.cat([zeroed[:1], zeroed[2:]]).min())
    # and twice every parameter (BatchNorm's too): the same (mean-normalised) scores
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    torch.testing.assert_close(torch_pruning_scores(model, EXAMPLE)[0], zeroed)
    step = prune_channels(model, EXAMPLE, params,
                          Precomputed(torch_pruning_scores(model, EXAMPLE)), 0.5)
    assert step.record()["predicted"]["flops_removed"] >= 0.5
    with pytest.raises(WfcoreError, match="does not match"):
        prune_channels(tiny_model(), EXAMPLE, select_params(tiny_model(), None),
                       Precomputed(scores[:1]), 0.5)


def test_tp_magnitude_scores_channels_only():
    with pytest.raises(ConfigError, match="structure.scores"):
        config.load(None, ["structure.unit=head", "structure.scores=tp_magnitude"])


def test_mean_normalised_scores_ignore_each_groups_scale():
    """structure.normalize: mean: a group's scores times 1000 remove the same channels;
    as they are (none), that group keeps more."""
    from wfcore.group_obs import Precomputed

    model = tiny_model()
    _, groups = prunable_groups(model, EXAMPLE)
    gen = torch.Generator().manual_seed(5)
    base = [torch.rand(g.size, generator=gen, dtype=torch.float64) + 0.1 for g in groups]
    scaled = [s * 1000 if k == 0 else s for k, s in enumerate(base)]

    def removed(scores, normalize):
        m = tiny_model()
        step = prune_channels(m, EXAMPLE, select_params(m, None), Precomputed(scores), 0.4,
                              update=False, shrink_model=False, normalize=normalize)
        return {g: sorted(c) for g, c in step.allocation.removed.items() if c}

    assert removed(base, "mean") == removed(scaled, "mean")
    assert len(removed(scaled, "none").get(0, [])) < len(removed(base, "none").get(0, []))
