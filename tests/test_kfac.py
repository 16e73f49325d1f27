"""K-FAC against explicit Kronecker products in float64, and its factors against autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from wfcore.plugins.kfac import Kfac, KfacCurvature, KfacOptions, damped_block

from wfcore.fisher.gradients import GradientSampler
from wfcore.interfaces import PruningProblem
from wfcore.masks import Masks, select_params


def spd(n: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A PSD (n, n) matrix of the given rank, like a factor estimated from few samples."""
    X = torch.randn(rank, n, generator=generator, dtype=torch.float64)
    return X.T @ X / rank


def explicit_fisher(A: torch.Tensor, G: torch.Tensor, damp: float, damping: str) -> torch.Tensor:
    """The damped F over the row-major flattening of W (out, in): kron(G, A) + damping."""
    if damping == "exact":
        return torch.kron(G, A) + damp * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
    gamma = math.sqrt(damp)
    return torch.kron(G + gamma / pi * torch.eye(G.shape[0], dtype=G.dtype),
                      A + pi * gamma * torch.eye(A.shape[0], dtype=A.dtype))


SHAPES = {"linear": (6, 5), "conv": (4, 3, 2, 2)}  # (out, in) and (out, C, kh, kw)


@pytest.mark.parametrize("damping", ["factored", "exact"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_inverse_diagonal_and_mul_match_explicit_inverse(kind, damping):
    g = torch.Generator().manual_seed(0)
    shape = SHAPES[kind]
    out, inp = shape[0], math.prod(shape[1:])
    A, G = spd(inp, 3, g), spd(out, 2, g)  # rank-deficient: damping matters
    damp = 1e-2
    curvature = KfacCurvature({"w": damped_block(A, G, damp, damping, shape)})
    F_inv = torch.linalg.inv(explicit_fisher(A, G, damp, damping))  # (out*in, out*in)
    diag = curvature.inverse_diagonal()["w"]
    assert diag.shape == shape
    torch.testing.assert_close(diag.reshape(-1), torch.diagonal(F_inv), rtol=1e-9, atol=1e-12)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(curvature.inverse_mul({"w": v})["w"].reshape(-1),
                               F_inv @ v.reshape(-1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damping", ["factored", "exact"])
@pytest.mark.parametrize("fraction", [0.2, 0.8])  # dual (few pruned) and primal (few kept)
def test_joint_update_is_the_exact_obs_solution(damping, fraction):
    g = torch.Generator().manual_seed(1)
    shape = (5, 2, 2, 2)
    A, G = spd(8, 4, g), spd(5, 3, g)
    damp = 1e-2
    curvature = KfacCurvature({"w": damped_block(A, G, damp, damping, shape)})
    F_inv = torch.linalg.inv(explicit_fisher(A, G, damp, damping))
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    prune = torch.rand(shape, generator=g) < fraction
    q = prune.reshape(-1).nonzero().squeeze(1)
    S = F_inv[q][:, q]
    expected = -F_inv[:, q] @ torch.linalg.solve(S, w.reshape(-1)[q])
    dw = curvature.prune_update({"w": prune}, {"w": w}, "joint")["w"]
    torch.testing.assert_close(dw.reshape(-1), expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close((w + dw)[prune], torch.zeros(int(prune.sum()), dtype=w.dtype),
                               rtol=0, atol=1e-10)
    # the independent update: the sum of single-weight OBS updates
    indep = curvature.prune_update({"w": prune}, {"w": w}, "independent")["w"]
    expected = -F_inv[:, q] @ (w.reshape(-1)[q] / torch.diagonal(F_inv)[q])
    torch.testing.assert_close(indep.reshape(-1), expected, rtol=1e-8, atol=1e-10)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def problem(num_grads: int, grad_batch: int = 1, seed: int = 0,
            labels: str = "empirical") -> PruningProblem:
    torch.manual_seed(seed)
    model = Tiny().double()
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(40, 2, 5, 5, generator=g,
                                                      dtype=torch.float64),
                                          torch.randint(0, 4, (40,), generator=g))
    params = select_params(model, None)
    masks = Masks(params)
    loss_fn = nn.CrossEntropyLoss()
    sampler = GradientSampler(model, params, masks.keep, data, loss_fn, num_grads=num_grads,
                              grad_batch=grad_batch, labels=labels, seed=seed,
                              dtype=torch.float64, progress=False)
    return PruningProblem(model, params, masks, sampler, loss_fn, torch.device("cpu"))


def first_samples(prob: PruningProblem, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples the estimator sees: the first n of its loader, shuffled by the seed."""
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(prob.source.dataset, batch_size=256, shuffle=True,
                                         generator=generator)
    x, y = next(iter(loader))
    return x[:n], y[:n]


def test_one_sample_linear_block_is_the_empirical_fisher():
    """With m = 1 the Fisher of a Linear layer is exactly g g^T (x) a a^T."""
    prob = problem(num_grads=1)
    curvature = Kfac(KfacOptions(damp=1e-3, damping="exact")).fit(prob)
    x, y = first_samples(prob, 1)
    loss = prob.loss_fn(prob.model(x), y)
    grad = torch.autograd.grad(loss, prob.model.fc.weight)[0].reshape(-1)  # (out*in,)
    F_exact = torch.outer(grad, grad) + 1e-3 * torch.eye(grad.numel(), dtype=torch.float64)
    F_inv = torch.linalg.inv(F_exact)
    diag = curvature.inverse_diagonal()["fc.weight"]
    torch.testing.assert_close(diag.reshape(-1), torch.diagonal(F_inv), rtol=1e-7, atol=1e-9)


def brute_force_factors(prob: PruningProblem, x: torch.Tensor, y: torch.Tensor, grad_batch: int):
    """A and G of the conv layer from explicit patches and per-position output gradients."""
    model = prob.model
    conv = model.conv
    xp = F.pad(x, (1, 1, 1, 1))
    patches, grads = [], []
    for start in range(0, len(x), grad_batch):
        xb, yb = x[start:start + grad_batch], y[start:start + grad_batch]
        s = conv(xb)
        s.retain_grad()
        loss = prob.loss_fn(model.fc(torch.flatten(F.relu(s), 1)), yb)
        loss.backward()
        for b in range(len(xb)):
            for i in range(s.shape[2]):
                for j in range(s.shape[3]):
                    patches.append(xp[start + b, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1))
                    grads.append(s.grad[b, :, i, j])
    P, Gr = torch.stack(patches), torch.stack(grads)
    model.zero_grad()
    return P.T @ P / len(P), Gr.T @ Gr / (len(x) // grad_batch)


@pytest.mark.parametrize("grad_batch", [1, 4])
def test_conv_factors_match_explicit_patches(grad_batch, monkeypatch):
    from wfcore.plugins import kfac

    prob = problem(num_grads=5, grad_batch=grad_batch)
    captured = {}
    real = kfac.collect_factors

    def spy(*args, **kwargs):
        captured.update(real(*args, **kwargs))
        return captured

    monkeypatch.setattr(kfac, "collect_factors", spy)
    Kfac(KfacOptions()).fit(prob)
    x, y = first_samples(prob, 5 * grad_batch)
    A_ref, G_ref = brute_force_factors(prob, x, y, grad_batch)
    A, G = captured["conv.weight"]
    torch.testing.assert_close(A, A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)


def test_same_seed_same_curvature():
    first = Kfac(KfacOptions()).fit(problem(num_grads=8)).inverse_diagonal()
    second = Kfac(KfacOptions()).fit(problem(num_grads=8)).inverse_diagonal()
    for n in first:
        assert torch.equal(first[n], second[n])
        assert torch.isfinite(first[n]).all() and (first[n] > 0).all()


def test_sampled_labels_are_reproducible_for_a_seed():
    """Labels drawn from the model come from the source's generator, seeded by the run."""
    def fit(seed: int) -> dict[str, torch.Tensor]:
        prob = problem(num_grads=8, labels="sampled")
        prob.source.seed = seed
        prob.source.reset()
        return Kfac(KfacOptions()).fit(prob).inverse_diagonal()

    first, again, other = fit(0), fit(0), fit(1)
    empirical = Kfac(KfacOptions()).fit(problem(num_grads=8)).inverse_diagonal()
    for n in first:
        assert torch.equal(first[n], again[n])
        assert not torch.equal(first[n], other[n])
        assert not torch.equal(first[n], empirical[n])


class Mixed(nn.Module):
    """A Linear beside what K-FAC has no factors for: a depthwise conv, an attention's
    packed in-projection."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.depthwise(x).flatten(2)  # (batch, 2, 4)
        return self.fc(self.attn(tokens, tokens, tokens)[0].flatten(1))


def test_parameters_without_kronecker_factors_get_the_diagonal_fisher(caplog):
    """The depthwise conv and the in-projection are prunable by default: K-FAC says so in
    one warning and gives them diag_fisher's curvature (with its own damp); the Linear
    layers keep their Kronecker blocks."""
    from wfcore.plugins import kfac
    from wfcore.plugins.diag_fisher import DiagFisher, DiagFisherOptions

    torch.manual_seed(0)
    model = Mixed().double()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(30, 2, 2, 2, generator=g,
                                                      dtype=torch.float64),
                                          torch.randint(0, 3, (30,), generator=g))
    params = select_params(model, None)
    assert "attn.in_proj_weight" in params and "depthwise.weight" in params

    def make_problem():
        masks = Masks(params)
        sampler = GradientSampler(model, params, masks.keep, data, nn.CrossEntropyLoss(),
                                  num_grads=6, seed=0, dtype=torch.float64, progress=False)
        return PruningProblem(model, params, masks, sampler, nn.CrossEntropyLoss(),
                              torch.device("cpu"))

    damp = 1e-3
    curvature = Kfac(KfacOptions(damp=damp)).fit(make_problem())
    assert set(curvature.blocks) == {"attn.out_proj.weight", "fc.weight"}
    assert "attn.in_proj_weight" in caplog.text and "diagonal empirical Fisher" in caplog.text
    diag = DiagFisher(DiagFisherOptions(damp=damp)).fit(
        make_problem().with_gradients()).inverse_diagonal()
    inv = curvature.inverse_diagonal()
    assert set(inv) == set(params)
    for n in ("attn.in_proj_weight", "depthwise.weight"):
        torch.testing.assert_close(inv[n], diag[n], rtol=1e-9, atol=0)
    # sampled one row at a time (what a model too large for the (m, d) store gets): the same
    one_row = kfac.diagonal_fisher(make_problem(), ["attn.in_proj_weight"], damp, chunk_bytes=1)
    torch.testing.assert_close(one_row.inverse_diag["attn.in_proj_weight"],
                               diag["attn.in_proj_weight"], rtol=1e-9, atol=0)
    w = {n: p.detach().clone() for n, p in params.items()}
    prune = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in w.items()}
    dw = curvature.prune_update(prune, w, "joint")
    for n in params:
        assert torch.all((w[n] + dw[n])[prune[n]].abs() < 1e-10), n
    assert math.isfinite(curvature.quadratic(dw))


@pytest.mark.parametrize("damping", ["factored", "exact"])
@pytest.mark.parametrize("fraction", [0.2, 0.8])  # dual (few pruned) and primal (few kept)
def test_joint_update_over_joint_max_is_exact_row_by_row(damping, fraction):
    """Over ``joint_max`` the joint update is solved inside each output row: it equals the
    OBS solution for the row's block of the explicit F (rows decoupled), with explicit
    float64 inverses, and zeroes exactly the pruned weights (no error, issue: MLPNet's fc1
    at 50 and 70% was refused)."""
    g = torch.Generator().manual_seed(2)
    shape = (4, 6)
    A, G = spd(6, 3, g), spd(4, 2, g)
    damp = 1e-2
    curvature = KfacCurvature({"w": damped_block(A, G, damp, damping, shape)}, joint_max=2)
    W = torch.randn(shape, generator=g, dtype=torch.float64)
    prune = torch.rand(shape, generator=g) < fraction
    prune[0, 0], prune[1, 0] = True, False  # no row is all pruned or all kept by chance
    dW = curvature.prune_update({"w": prune}, {"w": W}, "joint")["w"]
    F = explicit_fisher(A, G, damp, damping)
    for i in range(shape[0]):
        rows = slice(i * shape[1], (i + 1) * shape[1])
        F_inv = torch.linalg.inv(F[rows, rows])  # (in, in): row i alone
        Q = prune[i].nonzero().flatten()
        expected = -F_inv[:, Q] @ torch.linalg.inv(F_inv[Q][:, Q]) @ W[i, Q]
        torch.testing.assert_close(dW[i], expected, rtol=1e-8, atol=1e-10)
    assert torch.all((W + dW)[prune] == 0)
