"""`wfcore analyze`: the exact curvatures against brute force, and the command end to end."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from wfcore import cli
from wfcore.fisher.gradients import ParamLayout
from wfcore.tools.exact import DenseCurvature, ExactLoss, damped_inverse

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "mnist_mlpnet.yaml"


def two_layer_mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 5-4-3 MLP with tanh, and 12 labelled samples."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return model, x, y


def exact_loss(model: nn.Module, x, y, names=("0.weight", "2.weight")) -> ExactLoss:
    params = {n: p for n, p in model.named_parameters() if n in names}
    # batches of 5: 5 + 5 + 2 samples, so the chunk weighting is exercised
    return ExactLoss(model, params, x, y, nn.CrossEntropyLoss(), batch_size=5, progress=False)


def plain_gradient(model: nn.Module, names, x, y) -> torch.Tensor:
    """dL/dw by ordinary autograd on the module (no torch.func), flattened in order."""
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    params = dict(model.named_parameters())
    return torch.cat([params[n].grad.reshape(-1) for n in names])


def test_exact_hessian_equals_finite_differences_of_gradients():
    model, x, y = two_layer_mlp()
    names = ("0.weight", "2.weight")
    exact = exact_loss(model, x, y, names)
    H = exact.hessian()
    params = dict(model.named_parameters())
    h = 1e-6
    columns = []
    for name in names:
        p = params[name]
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += h
            plus = plain_gradient(model, names, x, y)
            with torch.no_grad():
                p.view(-1)[i] -= 2 * h
            minus = plain_gradient(model, names, x, y)
            with torch.no_grad():
                p.view(-1)[i] += h
            columns.append((plus - minus) / (2 * h))
    reference = torch.stack(columns, dim=1)  # (d, d)
    assert H.shape == (32, 32)
    torch.testing.assert_close(H, reference, rtol=1e-6, atol=1e-8)
    # the bias of the second layer is held fixed: its coupling must not leak in
    assert exact.d == 5 * 4 + 4 * 3


def test_exact_fishers_equal_explicit_sums_of_outer_products():
    model, x, y = two_layer_mlp(1)
    names = ("0.weight", "2.weight")
    exact = exact_loss(model, x, y, names)
    F_emp, F_true, kept = exact.fishers(keep_gradients=7)
    d = exact.d
    emp = torch.zeros(d, d, dtype=torch.float64)
    true = torch.zeros(d, d, dtype=torch.float64)
    grads = []
    for n in range(len(x)):
        g = plain_gradient(model, names, x[n:n + 1], y[n:n + 1])
        grads.append(g)
        emp += torch.outer(g, g)
        p = torch.softmax(model(x[n:n + 1]), dim=-1)[0].detach()
        for c in range(3):
            g_c = plain_gradient(model, names, x[n:n + 1], torch.tensor([c]))
            true += p[c] * torch.outer(g_c, g_c)
    torch.testing.assert_close(F_emp, emp / len(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(F_true, true / len(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kept, torch.stack(grads[:7]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exact.gradient(), plain_gradient(model, names, x, y))


def test_losses_of_perturbed_weights_match_the_module():
    model, x, y = two_layer_mlp(2)
    exact = exact_loss(model, x, y)
    W = exact.w0 + 0.1 * torch.randn(3, exact.d, dtype=torch.float64)
    losses = exact.losses(W)
    for row, value in zip(W, losses, strict=True):
        with torch.no_grad():
            for n, t in exact.layout.unflatten(row).items():
                dict(model.named_parameters())[n].copy_(t)
            assert float(nn.CrossEntropyLoss()(model(x), y)) == pytest.approx(float(value),
                                                                               rel=1e-12)


def test_dense_curvature_joint_update_is_the_exact_obs_solution():
    torch.manual_seed(3)
    A = torch.randn(8, 8, dtype=torch.float64)
    inverse, spectrum = damped_inverse(A @ A.T, 1e-2, psd=True)
    assert spectrum["negative"] == 0
    curvature = DenseCurvature(inverse, ParamLayout({"w": torch.zeros(8)}))
    w = {"w": torch.randn(8, dtype=torch.float64)}
    mask = {"w": torch.tensor([True, False, True, False, False, False, False, True])}
    dw = curvature.prune_update(mask, w, "joint")["w"]
    torch.testing.assert_close(dw[mask["w"]], -w["w"][mask["w"]])
    F = torch.linalg.inv(inverse)
    # the optimum of 0.5 dw^T F dw with dw_Q = -w_Q: the gradient vanishes off Q
    assert (F @ dw)[~mask["w"]].abs().max() < 1e-9


ESTIMATOR_PLUGIN = '''
    from __future__ import annotations

    import torch

    import wfcore
    from wfcore.interfaces import Curvature, HessianEstimator


    class ScaledIdentity(Curvature):
        def __init__(self, like):
            self.like = like

        def inverse_diagonal(self):
            return {n: torch.full_like(t, 2.0) for n, t in self.like.items()}

        def inverse_mul(self, v):
            return {n: 2.0 * t for n, t in v.items()}


    class ScaledIdentityEstimator(HessianEstimator):
        needs_gradients = False

        def fit(self, problem):
            return ScaledIdentity(problem.weights())


    @wfcore.hookimpl
    def wfcore_estimators():
        return {"scaled_identity": lambda options: ScaledIdentityEstimator()}
'''

TINY = ["train.epochs=1", "analyze.params=[fc3.weight]", "analyze.samples=64",
        "analyze.num_grads=[4,16]", "analyze.num_weights=40", "analyze.directions=3",
        "analyze.heatmap_param=fc3.weight", "analyze.heatmap_size=12",
        "analyze.sparsities=[0.5,0.9]"]


def test_cli_analyzes_a_third_party_estimator_and_writes_the_files(tmp_path, monkeypatch,
                                                                   one_thread):
    (tmp_path / "scaled_identity_plugin.py").write_text(textwrap.dedent(ESTIMATOR_PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    code = cli.main(["-q", "analyze", str(CONFIG), *TINY, f"output={out}",
                     "plugins=[scaled_identity_plugin]",
                     "analyze.estimators=[woodfisher,diag_fisher,kfac,scaled_identity]"])
    assert code == 0
    for name in ("analysis.json", "analysis.md", "heatmaps.png", "errors_vs_m.png",
                 "obs_single.png", "obs_sets.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "analysis.json").read_text())
    got = {(r["curvature"], r["m"]) for r in result["results"]}
    assert got == {("hessian", None), ("empirical_fisher", None), ("true_fisher", None)} | {
        (e, m) for e in ("woodfisher", "diag_fisher", "kfac", "scaled_identity") for m in (4, 16)}
    assert result["params"] == {"fc3.weight": 200}
    for r in result["results"]:
        assert -1.0 <= r["single"]["spearman"] <= 1.0
        assert len(r["single"]["actual"]) == 40
        assert all(v == v for v in r["inverse"]["hessian"].values())  # no NaN
    mine = next(r for r in result["results"] if r["curvature"] == "scaled_identity")
    # an identity curvature: its diagonal is exactly 2, and the scorer's joint update
    # (the base class has none) is reported instead of failing the analysis
    assert all("error" in s for s in mine["sets"])
    # the exact Hessian, made explicit, is its own reference: no error against itself
    hessian = next(r for r in result["results"] if r["curvature"] == "hessian")
    assert hessian["inverse"]["hessian"]["ihvp_random_rel_error"] < 1e-8
    md = (out / "analysis.md").read_text()
    assert "scaled_identity" in md and "## Summary" in md


@pytest.mark.parametrize("params, override, says", [
    ("[fc1.weight,fc2.*,fc3.*]", "analyze.max_memory_gb=0.001", "GiB"),
    ("[fc2.*,fc3.*]", "analyze.max_minutes=0.000001", "min"),
])
def test_refusal_is_one_line_naming_analyze_params(tmp_path, capsys, params, override, says):
    code = cli.main(["-q", "analyze", str(CONFIG), *TINY, f"analyze.params={params}", override,
                     f"output={tmp_path / 'run'}"])
    assert code == 2
    out = capsys.readouterr().err  # progress bars of the dense training may come first
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "wfcore: error" in line]
    assert len(errors) == 1
    err = errors[0][errors[0].index("wfcore: error"):]
    assert err.startswith("wfcore: error: analyze.params:") and says in err
    assert "analyze.params=[" in err or "no single parameter fits" in err
    assert not (tmp_path / "run" / "analysis.json").exists()


def test_unknown_estimator_names_the_key(tmp_path, capsys):
    code = cli.main(["analyze", str(CONFIG), "analyze.estimators=[nope]",
                     f"output={tmp_path / 'run'}"])
    assert code == 2
    assert "analyze.estimators: unknown estimator 'nope'" in capsys.readouterr().err
