"""WoodFisher against float64 brute force (tests/reference.py) on small sizes."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import reference as ref
import torch
from wfcore.plugins.schedulers import Iterative, IterativeOptions, substep_sparsities
from wfcore.plugins.woodfisher import (
    WoodFisher,
    WoodFisherCurvature,
    WoodFisherOptions,
    block_starts,
)

from wfcore import cli, config, manager, testing
from wfcore.errors import ConfigError, WfcoreError
from wfcore.fisher.gradients import GradientSampler, ParamLayout
from wfcore.interfaces import PruningProblem

SHAPES = {"a": (3, 4), "b": (8,), "c": (2, 5)}  # d = 30
D = 30
FORMS = ("dual", "primal", "recursive")
BLOCKS = {"full": [(0, 30)], "layer": [(0, 12), (12, 8), (20, 10)],
          5: [(0, 5), (5, 5), (10, 2), (12, 5), (17, 3), (20, 5), (25, 5)]}


class FixedSampler:
    """A stand-in for GradientSampler that hands out a fixed (m, d) matrix."""

    def __init__(self, G: torch.Tensor, shapes=SHAPES):
        self.G = G
        self.num_grads = G.shape[0]
        self.layout = ParamLayout({n: torch.empty(s) for n, s in shapes.items()})
        self.calls = 0

    def sample(self) -> torch.Tensor:
        self.calls += 1
        return self.G


def fit(G: torch.Tensor, shapes=SHAPES, **options) -> WoodFisherCurvature:
    problem = PruningProblem(None, None, None, FixedSampler(G, shapes), None,
                             torch.device("cpu")).with_gradients()
    options.setdefault("damp_mode", "absolute")  # the references take damp as lambda
    return WoodFisher(WoodFisherOptions(**options)).fit(problem)


def flat(cur: WoodFisherCurvature, tensors) -> torch.Tensor:
    return cur.layout.flatten(tensors)


def tree(cur: WoodFisherCurvature, vector: torch.Tensor):
    return cur.layout.unflatten(vector)


def close(actual, expected, rtol=1e-9):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max())


@pytest.fixture(params=[7, 45], ids=["m<B", "m>B"])
def G(request) -> torch.Tensor:
    gen = torch.Generator().manual_seed(request.param)
    return torch.randn(request.param, D, generator=gen, dtype=torch.float64)


def problem_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=gen, dtype=torch.float64)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D, generator=gen)[:11]] = True
    return w, mask, mask.nonzero().flatten().tolist()


def test_block_starts_cover_every_weight_once():
    layout = ParamLayout({n: torch.empty(s) for n, s in SHAPES.items()})
    for size, blocks in BLOCKS.items():
        starts = block_starts(layout, size)
        got = sorted((o, B) for B, offsets in starts.items() for o in offsets)
        assert got == blocks


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("block_size", list(BLOCKS))
def test_inverse_matches_explicit_inverse(G, form, block_size):
    damp = 0.05
    cur = fit(G, damp=damp, form=form, block_size=block_size)
    F_inv = ref.inverse(ref.block_fisher(G, damp, BLOCKS[block_size]))
    close(flat(cur, cur.inverse_diagonal()), F_inv.diagonal())
    v = torch.randn(D, dtype=torch.float64)
    close(flat(cur, cur.inverse_mul(tree(cur, v))), F_inv @ v)


# a conv-shaped parameter (72 weights: 6 input channels, a smaller trailing group of 4),
# a 1-D one and a linear one (5 input channels); blocks of 60 cut the first in two at
# weight (2, 3, 0, 0), inside groups of 4 channels
CONV_SHAPES = {"a": (3, 6, 2, 2), "b": (8,), "c": (2, 5)}
CONV_BLOCKS = {"layer": [(0, 72), (72, 8), (80, 10)],
               60: [(0, 60), (60, 12), (72, 8), (80, 10)]}


@pytest.mark.parametrize("m", [7, 100], ids=["m<B", "m>B"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("block_size", list(CONV_BLOCKS))
@pytest.mark.parametrize("block", [4, 3])
def test_inverse_blocks_are_the_blocks_of_the_explicit_inverse(m, form, block_size, block):
    G = torch.randn(m, 90, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    cur = fit(G, CONV_SHAPES, damp=0.05, form=form, block_size=block_size)
    F_inv = ref.inverse(ref.block_fisher(G, 0.05, CONV_BLOCKS[block_size]))
    blocks = cur.inverse_blocks(block)
    expected = testing.group_blocks(F_inv, cur.layout, block)
    assert {n: t.shape for n, t in blocks.items()} == {n: t.shape for n, t in expected.items()}
    for n in expected:
        close(blocks[n], expected[n])
    # channels 0 and 3 of output 2 lie in two curvature blocks: zero there, not elsewhere
    if block_size == 60 and block == 4:
        assert blocks["a"][2, :, :, 0, 0, 3].eq(0).all()
        assert blocks["a"][1, :, :, 0, 0, 3].ne(0).all()


def test_inverse_blocks_stream_the_chunks_when_the_factors_are_not_cached():
    G = torch.randn(7, 90, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cur = fit(G, CONV_SHAPES, damp=0.05, form="primal", block_size=60, max_memory_gb=9e-5)
    assert cur.cache is None and len(cur.chunks) == 2
    F_inv = ref.inverse(ref.block_fisher(G, 0.05, CONV_BLOCKS[60]))
    blocks = cur.inverse_blocks(4)
    for n, expected in testing.group_blocks(F_inv, cur.layout, 4).items():
        close(blocks[n], expected)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("block_size", list(BLOCKS))
def test_prune_updates_match_brute_force(G, form, block_size):
    damp = 0.05
    cur = fit(G, damp=damp, form=form, block_size=block_size)
    F = ref.block_fisher(G, damp, BLOCKS[block_size])
    F_inv = ref.inverse(F)
    w, mask, Q = problem_data()
    independent = flat(cur, cur.prune_update(tree(cur, mask), tree(cur, w), "independent"))
    close(independent, ref.independent_update(F_inv, w, Q))
    joint = flat(cur, cur.prune_update(tree(cur, mask), tree(cur, w), "joint"))
    close(joint, ref.joint_update(F_inv, w, Q))
    # the joint update zeroes Q itself (the masks then make it exact) ...
    assert (w + joint)[mask].abs().max() < 1e-12 * w.abs().max()
    # ... and is the cheapest change that does, on the quadratic model
    applied_independent = torch.where(mask, -w, independent)  # the masks zero Q
    assert ref.quadratic(F, joint) <= ref.quadratic(F, applied_independent) * (1 + 1e-12)
    # the predicted loss increase is 1/2 dw^T F dw
    increase = cur.predicted_increase(tree(cur, mask), tree(cur, w))
    close(torch.tensor(increase, dtype=torch.float64), ref.joint_increase(F_inv, w, Q))
    close(torch.tensor(increase, dtype=torch.float64), ref.quadratic(F, joint))
    model_increase = cur.quadratic(tree(cur, joint))
    close(torch.tensor(model_increase, dtype=torch.float64), ref.quadratic(F, joint))


@pytest.mark.parametrize("form", FORMS)
def test_single_weight_obs_increase_is_the_quadratic(G, form):
    cur = fit(G, damp=0.05, form=form, block_size="layer")
    F = ref.block_fisher(G, 0.05, BLOCKS["layer"])
    F_inv = ref.inverse(F)
    w, _, _ = problem_data(1)
    diag = flat(cur, cur.inverse_diagonal())
    for q in (0, 13, 29):
        mask = torch.zeros(D, dtype=torch.bool)
        mask[q] = True
        dw = flat(cur, cur.prune_update(tree(cur, mask), tree(cur, w), "joint"))
        close(dw, ref.single_obs_update(F_inv, w, q))
        score = w[q] ** 2 / (2 * diag[q])  # the obs scorer's rho_q
        close(score, ref.single_obs_increase(F_inv, w, q))
        close(score, ref.quadratic(F, dw))


def test_batched_blocks_equal_blocks_one_by_one(G):
    cur = fit(G, damp=0.05, block_size=5)
    w, mask, _ = problem_data(2)
    v = torch.randn(D, dtype=torch.float64)
    diag, mul = flat(cur, cur.inverse_diagonal()), flat(cur, cur.inverse_mul(tree(cur, v)))
    joint = flat(cur, cur.prune_update(tree(cur, mask), tree(cur, w), "joint"))
    for start, size in BLOCKS[5]:
        part = slice(start, start + size)
        one = WoodFisher(WoodFisherOptions(damp=0.05, damp_mode="absolute",
                                           block_size="full")).fit(PruningProblem(
            None, None, None, FixedSampler(G[:, part], {"x": (size,)}), None,
            "cpu").with_gradients())
        torch.testing.assert_close(diag[part], one.inverse_diagonal()["x"], rtol=1e-12,
                                   atol=0)
        torch.testing.assert_close(mul[part], one.inverse_mul({"x": v[part]})["x"],
                                   rtol=1e-11, atol=1e-12)
        one_joint = one.prune_update({"x": mask[part]}, {"x": w[part]}, "joint")["x"]
        torch.testing.assert_close(joint[part], one_joint, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["independent", "joint"])
def test_earlier_pruned_weights_stay_exactly_zero(G, form, mode):
    """Pruned weights have zero gradient columns and zero weight: no update moves them."""
    pruned = torch.zeros(D, dtype=torch.bool)
    pruned[[1, 2, 14, 22, 23]] = True
    G = G.masked_fill(pruned, 0.0)
    w, mask, _ = problem_data(3)
    w = w.masked_fill(pruned, 0.0)
    mask &= ~pruned
    for block_size in BLOCKS:
        cur = fit(G, damp=1e-3, form=form, block_size=block_size)
        dw = flat(cur, cur.prune_update(tree(cur, mask), tree(cur, w), mode))
        assert (dw[pruned] == 0).all()
        diag = flat(cur, cur.inverse_diagonal())[pruned]
        torch.testing.assert_close(diag, torch.full_like(diag, 1e3), rtol=1e-12, atol=0)


def test_failed_cholesky_raises_damping_and_logs(caplog):
    G = torch.ones(40, 12, dtype=torch.float64)  # rank 1: F is singular in float32
    with caplog.at_level(logging.WARNING, logger="wfcore.plugins.woodfisher"):
        cur = fit(G, {"x": (12,)}, damp=1e-9, form="primal", block_size="full",
                  dtype="float32")
    assert "Cholesky failed" in caplog.text and "raising damp" in caplog.text
    assert torch.isfinite(flat(cur, cur.inverse_diagonal())).all()


def test_too_large_a_block_is_refused_before_sampling():
    sampler = FixedSampler(torch.randn(10, D))
    problem = PruningProblem(None, None, None, sampler, None, torch.device("cpu"))
    estimator = WoodFisher(WoodFisherOptions(block_size="full", form="primal",
                                             max_memory_gb=1e-6))
    with pytest.raises(WfcoreError, match=r"needs .* GiB"):
        estimator.fit(problem)
    assert sampler.calls == 0


def seeded_fit(seed: int) -> torch.Tensor:
    """diag(F^-1) of WoodFisher fitted on the gradients a GradientSampler draws under
    ``seed``: 6 of 40 samples (which ones, the seed decides). The model's weights come from
    a generator of their own, so the global RNG plays no part."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(5, 3, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, generator=gen, dtype=torch.float64))
        model.bias.zero_()
    data = torch.utils.data.TensorDataset(torch.randn(40, 5, generator=gen, dtype=torch.float64),
                                          torch.randint(0, 3, (40,), generator=gen))
    params = {"weight": model.weight}
    sampler = GradientSampler(model, params, {"weight": torch.ones(3, 5, dtype=torch.bool)},
                              data, torch.nn.functional.cross_entropy, num_grads=6, seed=seed,
                              dtype=torch.float64, progress=False)
    problem = PruningProblem(model, params, None, sampler, None,
                             torch.device("cpu")).with_gradients()
    cur = WoodFisher(WoodFisherOptions(block_size=5)).fit(problem)
    return cur.layout.flatten(cur.inverse_diagonal())


def test_same_answer_under_a_fixed_seed():
    torch.manual_seed(1)  # the global RNG differs between the two fits: it must not matter
    a = seeded_fit(0)
    torch.manual_seed(2)
    b = seeded_fit(0)
    assert torch.equal(a, b)
    assert not torch.allclose(seeded_fit(1), a)  # the seed chooses the samples


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("form", FORMS)
def test_cuda_matches_cpu(G, form):
    w, mask, _ = problem_data()
    out = []
    for device in ("cpu", "cuda"):
        problem = PruningProblem(None, None, None, FixedSampler(G.to(device)), None,
                                 torch.device(device)).with_gradients()
        cur = WoodFisher(WoodFisherOptions(damp=0.05, form=form, block_size=5)).fit(problem)
        dw = cur.prune_update(tree(cur, mask.to(device)), tree(cur, w.to(device)), "joint")
        out.append(flat(cur, dw).cpu())
    close(out[1], out[0])


def estimator_options(overrides: list[str]):
    """The woodfisher options a run would build from ``overrides`` (``Plugins.choose``)."""
    cfg = config.load(None, ["estimator.name=woodfisher", *overrides])
    return manager.build().choose("estimators",
                                  manager.Section.of(cfg.estimator, "estimator")).options


@pytest.mark.parametrize("key, value", [("form", "qr"), ("block_size", "rows"),
                                        ("damp", "0"), ("dtype", "float16")])
def test_bad_options_name_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError) as caught:
        estimator_options([f"estimator.{key}={value}"])
    message = str(caught.value)
    # one line naming the section and the option (estimator.<key>, or "estimator: <key>")
    assert "\n" not in message
    assert re.search(rf"\bestimator\b.*\b{key}\b", message), message
    estimator_options([])  # the default is fine


def test_block_size_accepts_int_and_names():
    for value, expected in (("128", 128), ("layer", "layer"), ("full", "full")):
        assert estimator_options([f"estimator.block_size={value}"]).block_size == expected


def test_iterative_plan():
    assert substep_sparsities(0.8, 4) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    poly = substep_sparsities(0.8, 4, "polynomial")
    assert poly[-1] == 0.8 and all(a < b for a, b in zip(poly, poly[1:], strict=False))
    assert poly[0] > 0.2  # large steps first
    plan = Iterative(IterativeOptions(sparsities=[0.5, 0.9], steps=3)).plan()
    assert [p.target_sparsity for p in plan] == [0.5, 0.9]
    assert all(p.from_dense and len(p.substeps) == 3 for p in plan)
    assert plan[1].substeps[-1] == 0.9


def test_registered():
    plugins = manager.build()
    assert "woodfisher" in plugins.registry("estimators").names()
    assert {"obs", "woodtaylor"} <= set(plugins.registry("scorers").names())
    assert {"oneshot", "iterative"} <= set(plugins.registry("schedulers").names())


# -- end to end -------------------------------------------------------------------------

ROOT = Path(__file__).parents[1]


def prune(tmp_path: Path, config_name: str, *overrides: str) -> dict:
    out = tmp_path / "run"
    code = cli.main(["-q", "prune", "--force", str(ROOT / "configs" / config_name),
                     f"output={out}", *overrides])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def accuracies(report: dict) -> dict[float, float]:
    return {s["target_sparsity"]: s["accuracy"] for s in report["steps"]}


@pytest.mark.parametrize("scorer", [["scorer.update=joint", "scheduler.name=iterative",
                                     "scheduler.steps=3"],
                                    ["scorer.name=woodtaylor", "scorer.update=independent"]])
def test_pipeline_prunes_to_target_with_exact_zeros(tmp_path, scorer):
    report = prune(tmp_path, "mnist_mlpnet.yaml", "train.epochs=1", "fisher.num_grads=64",
                   "estimator.block_size=layer", "scheduler.sparsities=[0.5,0.9]", *scorer)
    for index, step in enumerate(report["steps"]):
        assert abs(step["sparsity"] - step["target_sparsity"]) <= 0.001
        state = torch.load(tmp_path / "run" / f"model_step{index}.pt", weights_only=True)
        layers = step["layers"]
        zeros = sum(int((state[n] == 0).sum()) for n in layers)
        assert zeros == round(sum(v["sparsity"] * v["numel"] for v in layers.values()))
        assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.slow
def test_mnist_cnn_acceptance(tmp_path):
    """95% one-shot global: joint >= magnitude + 8 points, iterative (8) >= magnitude + 14."""
    runs = {}
    for name, overrides in {"magnitude": ["estimator.name=magnitude", "scorer.update=none"],
                            "joint": [],
                            "iterative": ["scheduler.name=iterative", "scheduler.steps=8"]
                            }.items():
        runs[name] = accuracies(prune(tmp_path / name, "mnist_cnn.yaml",
                                      "scheduler.sparsities=[0.95]", *overrides))[0.95]
    assert runs["joint"] >= runs["magnitude"] + 0.08, runs
    assert runs["iterative"] >= runs["magnitude"] + 0.14, runs


class Unlabelled(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i][0]  # the image alone


@pytest.mark.slow
def test_sampled_labels_without_labels_match_empirical(tmp_path, monkeypatch):
    """fisher.labels=sampled with the labels removed: within 2 points of empirical at 90%."""
    from wfcore.plugins import datasets

    result = {}
    for labels in ("empirical", "sampled"):
        if labels == "sampled":  # the sampler's data (the train set) loses its labels
            original = datasets.mnist5k

            def unlabelled(options, data, original=original):
                bundle = original(options, data)
                bundle.train = Unlabelled(bundle.train)
                return bundle

            unlabelled.Options = original.Options
            monkeypatch.setattr(datasets, "mnist5k", unlabelled)
            dense = tmp_path / "empirical" / "run" / "dense.pt"
            overrides = [f"model.checkpoint={dense}"]
        else:
            overrides = []
        report = prune(tmp_path / labels, "mnist_cnn.yaml", "scheduler.sparsities=[0.9]",
                       f"fisher.labels={labels}", *overrides)
        result[labels] = accuracies(report)[0.9]
    assert abs(result["sampled"] - result["empirical"]) <= 0.02, result


@pytest.mark.parametrize("m", [128, 131, 203])  # parts of rows: even, uneven, m > B
def test_row_parts_of_the_dual_form_match_explicit_inverse(m):
    """m >= TRIANGLE_MIN_ROWS: K = G G^T and L^-1 G are taken in row parts (only the
    blocks on and below the diagonal multiplied): diag(F^-1) and the joint update still
    equal the explicit inverse's."""
    from wfcore.plugins.woodfisher.algebra import gram, row_parts

    assert len(row_parts(m)) > 1
    gen = torch.Generator().manual_seed(m)
    G = torch.randn(m, 300, generator=gen, dtype=torch.float64)
    blocks = G.view(m, 2, 150).transpose(0, 1).contiguous()  # (2, m, 150)
    torch.testing.assert_close(gram(blocks), blocks @ blocks.transpose(1, 2),
                               rtol=1e-12, atol=1e-10)
    damp, shapes = 0.05, {"a": (300,)}
    cur = fit(G, shapes, damp=damp, form="dual", block_size=200)
    F_inv = ref.inverse(ref.block_fisher(G, damp, [(0, 200), (200, 100)]))
    close(flat(cur, cur.inverse_diagonal()), F_inv.diagonal())
    w = torch.randn(300, generator=gen, dtype=torch.float64)
    mask = torch.rand(300, generator=gen) < 0.8
    Q = mask.nonzero().flatten()
    for a, b in [(0, 200), (200, 300)]:  # the joint OBS update of each block, explicitly
        q = Q[(Q >= a) & (Q < b)]
        block = F_inv[a:b, a:b]
        x = torch.linalg.solve(block[(q - a)][:, (q - a)], w[q])
        expected = -block[:, q - a] @ x
        update = flat(cur, cur.prune_update({"a": mask}, {"a": w}, "joint"))[a:b]
        close(update, expected)
    # the quadratic model's value of the whole change, which the update's pass took from
    # its own loss increase, against dw^T F dw / 2 with F explicit
    change = torch.where(mask, -w, flat(cur, cur.prune_update({"a": mask}, {"a": w}, "joint")))
    F = ref.block_fisher(G, damp, [(0, 200), (200, 100)])
    assert cur.quadratic({"a": change}) == pytest.approx(float(change @ F @ change) / 2,
                                                         rel=1e-9)
