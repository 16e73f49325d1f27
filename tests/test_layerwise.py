"""The layer-wise estimators' orchestration: input columns, sequential order, pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from wfcore.plugins import exact_obs
from wfcore.plugins.layer_allocation import lower_hull
from wfcore.plugins.layer_hessian import HessianSum, columns_of
from wfcore.plugins.layerwise import ExactOBS, ExactOBSOptions, SparseGPT, Wanda

from wfcore import cli
from wfcore.fisher.gradients import GradientSampler
from wfcore.interfaces import PruningProblem
from wfcore.masks import Masks, select_params, to_groups

ROOT = Path(__file__).parents[1]


def problem(model: nn.Module, inputs: torch.Tensor, classes: int = 3,
            params: list[str] | None = None) -> PruningProblem:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(inputs, torch.randint(0, classes, (len(inputs),),
                                                                generator=g))
    params = select_params(model, params)
    masks = Masks(params)
    loss_fn = nn.CrossEntropyLoss()
    sampler = GradientSampler(model, params, masks.keep, data, loss_fn, num_grads=4,
                              seed=0, dtype=torch.float64, progress=False)
    return PruningProblem(model, params, masks, sampler, loss_fn, torch.device("cpu"))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.Conv2d(4, 6, (3, 2), groups=2, dilation=2),
    nn.Conv2d(4, 4, 3, groups=4), nn.Conv1d(4, 6, 3, padding=2, groups=2)])
def test_conv_through_unfold_is_a_linear_layer_on_its_columns(conv):
    """Each group's rows times its unfolded columns give the conv's output: the H of the
    columns is the H of a Linear layer fed the unfolded input."""
    conv = conv.double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    x = x[..., 0, :] if isinstance(conv, nn.Conv1d) else x
    y = conv(x) - conv.bias.view(1, -1, *[1] * (x.dim() - 2))
    rows = conv.out_channels // conv.groups
    for k in range(conv.groups):
        cols = columns_of(conv, x, k)  # (n * L, cols)
        W = conv.weight[k * rows:(k + 1) * rows].flatten(1)
        want = y[:, k * rows:(k + 1) * rows].flatten(2).transpose(1, 2).reshape(-1, rows)
        assert_close(cols @ W.T, want)


def test_conv_pruned_layer_wise_equals_the_linear_case_on_the_unfolded_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, groups=1).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(5 * 4 * 4, 3).double())
    x = torch.randn(40, 3, 6, 6, dtype=torch.float64)
    prob = problem(model, x, params=["0.weight"])
    keep = {"0.weight": torch.ones_like(conv.weight, dtype=torch.bool)}
    keep["0.weight"].view(-1)[:60] = False  # 60 zeros (the count is what is used)
    est = ExactOBS(ExactOBSOptions(samples=40, batch_size=16, damp=0.01, dtype="float64"))
    update, new_keep = est.prune_layers(prob, keep)
    acc = HessianSum(27, "cpu")
    acc.add(columns_of(conv, x, 0))
    want = exact_obs.prune(conv.weight.detach().flatten(1), acc.H,
                           torch.ones(5, 27, dtype=torch.bool), 60, 0.01)
    assert_close((conv.weight.detach() + update["0.weight"]).flatten(1), want.weights,
                 rtol=0, atol=1e-9)
    assert torch.equal(new_keep["0.weight"].flatten(1), want.keep)


@pytest.mark.parametrize("estimator", [ExactOBS, SparseGPT, Wanda])
def test_each_layer_sees_the_already_pruned_layers_before_it(estimator):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(50, 8, dtype=torch.float64)
    prob = problem(model, x)
    keep = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prob.params.items()}
    keep["0.weight"].view(-1)[:30] = False
    keep["2.weight"].view(-1)[:10] = False
    est = estimator(estimator.Options(samples=50, batch_size=50))
    update, new_keep = est.prune_layers(prob, keep)
    for p in prob.params.values():  # the model is left as it came
        assert (p != 0).all()
    model.requires_grad_(False)
    # by hand: layer 0 on the dense inputs, layer 2 on the pruned layer 0's outputs
    first = est.prune_matrix(model[0].weight.detach(), 2 * x.T @ x / 50,
                             torch.ones(6, 8, dtype=torch.bool), 30, None)
    h = torch.relu(x @ first.weights.T + model[0].bias.detach())
    second = est.prune_matrix(model[2].weight.detach(), 2 * h.T @ h / 50,
                              torch.ones(3, 6, dtype=torch.bool), 10, None)
    assert_close(model[2].weight.detach() + update["2.weight"], second.weights,
                 rtol=0, atol=1e-9)
    assert int((~new_keep["0.weight"]).sum()) == 30 and int((~new_keep["2.weight"]).sum()) == 10
    # on the dense inputs, the second layer would have come out otherwise
    dense = est.prune_matrix(model[2].weight.detach(),
                             2 * torch.relu(model[0](x)).T @ torch.relu(model[0](x)) / 50,
                             torch.ones(3, 6, dtype=torch.bool), 10, None)
    assert abs(dense.error - second.error) > 1e-6


def test_attention_in_projection_sees_query_key_value():
    torch.manual_seed(2)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn
            self.head = nn.Linear(8, 3).double()

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Net()
    x = torch.randn(20, 5, 8, dtype=torch.float64)
    prob = problem(model, x, params=["attn.in_proj_weight"])
    keep = {"attn.in_proj_weight": torch.ones_like(attn.in_proj_weight, dtype=torch.bool)}
    keep["attn.in_proj_weight"].view(-1)[:96] = False
    est = ExactOBS(ExactOBSOptions(samples=20, batch_size=20, dtype="float64"))
    update, new_keep = est.prune_layers(prob, keep)
    X = x.reshape(-1, 8)
    H = 2 * X.T @ X / X.shape[0]
    W = attn.in_proj_weight.detach()
    for k in range(3):  # query, key, value: 96 zeros shared as the allocator's mask did
        rows = slice(8 * k, 8 * (k + 1))
        want = exact_obs.prune(W[rows], H, torch.ones(8, 8, dtype=torch.bool),
                               int((~keep["attn.in_proj_weight"][rows]).sum()), 0.01)
        assert_close(W[rows] + update["attn.in_proj_weight"][rows], want.weights,
                     rtol=0, atol=1e-9)


def test_lower_hull_drops_points_above_it():
    assert lower_hull([0, 1, 2, 3], [0, 0.5, 0.6, 2]) == [(0, 0), (2, 0.6), (3, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["mnist_mlpnet", "mnist_cnn"])
@pytest.mark.parametrize("estimator", ["exact_obs", "sparsegpt", "wanda", "woodfisher",
                                       "kfac", "diag_fisher", "magnitude"])
def test_two_of_four_on_the_shipped_models(tmp_path, config, estimator):
    out = tmp_path / "run"
    code = cli.main(["-q", "prune", str(ROOT / "configs" / f"{config}.yaml"),
                     f"estimator.name={estimator}", "structure.pattern='2:4'",
                     "scheduler.sparsities=[0.5]", "train.epochs=1", "fisher.num_grads=100",
                     "estimator.samples=200" if estimator in ("exact_obs", "sparsegpt", "wanda")
                     else "seed=0", f"output={out}"])
    assert code == 0
    state = torch.load(out / "model_step0.pt", weights_only=True)
    report = json.loads((out / "report.json").read_text())
    for name in report["steps"][0]["layers"]:
        groups = to_groups(state[name] == 0, 4, False, cap=False)  # (*, 4), as N:M cuts them
        full = to_groups(torch.ones_like(state[name], dtype=torch.bool), 4, False,
                         cap=False).all(-1)
        assert (groups[full].sum(-1) == 2).all(), name
        assert (groups.sum(-1) <= groups.shape[-1]).all()


def test_reconstruction_allocation_meets_the_target_exactly_and_spares_fragile_layers():
    from wfcore.plugins.allocators import GlobalAllocator

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(60, 12, dtype=torch.float64)
    x[:, 6:] *= 0.01  # half the inputs barely matter: the first layer can bear more zeros
    prob = problem(model, x)
    est = ExactOBS(ExactOBSOptions(samples=60, batch_size=60, allocation="reconstruction",
                                   dtype="float64"))
    curvature = est.fit(prob)
    scores = est.paired_scorer().scores(prob.weights(), curvature, None)
    keep = GlobalAllocator().allocate(scores, dict(prob.masks.keep), 0.6)
    zeros = {n: int((~k).sum()) for n, k in keep.items()}
    assert sum(zeros.values()) == round(0.6 * (96 + 24))
    assert zeros["0.weight"] / 96 > zeros["2.weight"] / 24
    update, new_keep = est.prune_layers(prob, keep)
    assert {n: int((~k).sum()) for n, k in new_keep.items()} == zeros
