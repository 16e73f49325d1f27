"""The gradient store, streamed WoodFisher chunks and the plan of a run."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from wfcore.plugins.allocators import GlobalAllocator
from wfcore.plugins.models import MLPNet, MnistCNN
from wfcore.plugins.scorers import Obs
from wfcore.plugins.woodfisher import (
    DTYPES,
    WoodFisher,
    WoodFisherOptions,
    block_bytes,
    block_starts,
    choose_form,
)

from wfcore import cli
from wfcore.errors import WfcoreError
from wfcore.fisher import store as store_module
from wfcore.fisher.gradients import GradientSampler, ParamLayout
from wfcore.fisher.store import GradientStore
from wfcore.interfaces import PruningProblem
from wfcore.masks import Masks, select_params

ROOT = Path(__file__).parents[1]


def open_store_files() -> list[str]:
    """This process's open files that are gradient stores (named or already unlinked)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if ".wfcore-gradients-" in target:
            out.append(target)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("place", "tile"), [("memory", None), ("disk", None), ("disk", 7)])
def test_rows_written_in_chunks_read_back_by_columns(tmp_path, monkeypatch, place, tile,
                                                     dtype):
    if tile is not None:  # tiles of 7 columns on disk: 14 and a last one of 3
        monkeypatch.setattr(store_module, "TILE_BYTES", 13 * dtype.itemsize * tile)
    G = torch.randn(13, 101, generator=torch.Generator().manual_seed(0))
    with GradientStore(13, 101, dtype=dtype, place=place, directory=tmp_path) as store:
        assert store.tile == (tile or 101) or place == "memory"
        for start in range(0, 13, 5):
            store.write(start, G[start:start + 5])
        expected = G.to(dtype)
        for a, b in [(0, 101), (7, 8), (40, 99), (7, 14), (3, 5), (98, 101), (5, 5),
                     *store.column_ranges(17)]:
            assert torch.equal(store.columns(a, b), expected[:, a:b])
        torch.testing.assert_close(store.columns(3, 9, torch.float64),
                                   expected[:, 3:9].double(), rtol=0, atol=0)
        torch.testing.assert_close(store.mean(budget_bytes=500),
                                   expected.double().mean(0).float())
        torch.testing.assert_close(store.square_mean(budget_bytes=500),
                                   expected.double().square().mean(0))
        if place == "disk":
            assert store.nbytes == 13 * 101 * dtype.itemsize
            assert not list(tmp_path.iterdir())  # nameless while in use
            assert len(open_store_files()) == 1
    assert not open_store_files()


def test_disk_store_refused_when_the_disk_is_too_small(tmp_path):
    with pytest.raises(WfcoreError, match=r"GiB needed on disk .* free"):
        GradientStore(10**6, 10**6, place="disk", directory=tmp_path)
    assert not list(tmp_path.iterdir()) and not open_store_files()


# -- streamed chunks equal the in-memory fit ---------------------------------------------

def gradients(model: torch.nn.Module, params: list[str], m: int) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(0)
    model = model.double()
    chosen = select_params(model, params)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 28, 28, generator=g, dtype=torch.float64)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (64,), generator=g))
    masks = Masks(chosen)
    sampler = GradientSampler(model, chosen, masks.keep, data, torch.nn.CrossEntropyLoss(),
                              num_grads=m, dtype=torch.float64, progress=False)
    return chosen, sampler.sample()


def fit(params, G: torch.Tensor, store: GradientStore, **options):
    problem = PruningProblem(None, params, None, _Layout(params, G.shape[0]), None,
                             torch.device("cpu"), store)
    return WoodFisher(WoodFisherOptions(damp=1e-3, **options)).fit(problem)


class _Layout:
    def __init__(self, params, m):
        self.layout, self.num_grads = ParamLayout(params), m


CASES = {"mlpnet": (MLPNet, ["fc2.weight", "fc3.weight"]),
         "mnist_cnn": (MnistCNN, ["conv1.weight", "fc.weight"])}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("form", ["auto", "dual", "primal", "recursive"])
@pytest.mark.parametrize("block_size", [64, "layer", "full"])
def test_chunks_on_disk_equal_the_in_memory_fit(tmp_path, case, form, block_size):
    make, names = CASES[case]
    if form in ("primal", "recursive") and case == "mnist_cnn":
        names = names[:1]  # B x B forms of the 5,120-weight fc: slow, nothing more tested
    params, G = gradients(make(), names, m=24)
    layout = ParamLayout(params)
    # the budget holds a few blocks: int blocks are streamed in many chunks
    largest = max(block_bytes(choose_form(form, 24, B), 24, B, 8) + 24 * B * 8
                  for B in block_starts(layout, block_size))
    few = 4.5 if block_size == 64 else 1.5  # nothing cached: the update streams again
    small = {"max_memory_gb": few * largest / 2**30}
    reference = fit(params, G, GradientStore.from_tensor(G), form=form, block_size=block_size)
    with GradientStore(24, layout.d, dtype=torch.float64, place="disk",
                       directory=tmp_path) as store:
        store.write(0, G)
        streamed = fit(params, G, store, form=form, block_size=block_size, **small)
        assert streamed.cache is None and reference.cache is not None
        if block_size == 64:
            assert len(streamed.chunks) >= 2
        weights = {n: p.detach().clone() for n, p in params.items()}
        masks = []
        for cur in (reference, streamed):
            scores = Obs().scores(weights, cur, None)
            keep = GlobalAllocator().allocate(scores, {n: torch.ones_like(w, dtype=torch.bool)
                                                       for n, w in weights.items()}, 0.7)
            masks.append({n: ~k for n, k in keep.items()})
        for n in weights:
            assert torch.equal(masks[0][n], masks[1][n])
        for mode in ("independent", "joint"):
            a = reference.prune_update(masks[0], weights, mode)
            b = streamed.prune_update(masks[0], weights, mode)
            for n in weights:
                torch.testing.assert_close(b[n], a[n], rtol=1e-12,
                                           atol=1e-12 * float(a[n].abs().max()))
        assert streamed.predicted_increase(masks[0], weights) == pytest.approx(
            reference.predicted_increase(masks[0], weights), rel=1e-12)
    assert not open_store_files()


@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_passes_over_a_disk_store_alternate_and_the_updates_quadratic_reads_none(
        tmp_path, form, mode):
    """The fit reads each chunk once, first to last; the update once, last to first (the
    chunks the fit read last first, while the page cache still holds them); the quadratic
    model's value of that update (what the safeguard's record asks) reads nothing and
    equals the in-memory fit's; any other change is streamed, first to last again. Masks
    equal and updates within 1e-12 of the in-memory fit, in float64."""
    params, G = gradients(MLPNet(), ["fc2.weight", "fc3.weight"], m=24)
    layout = ParamLayout(params)
    largest = block_bytes(choose_form(form, 24, 64), 24, 64, 8) + 24 * 64 * 8
    reference = fit(params, G, GradientStore.from_tensor(G), form=form, block_size=64)
    with GradientStore(24, layout.d, dtype=torch.float64, place="disk",
                       directory=tmp_path) as store:
        rows = G.clone()
        store.write(0, G)
        assert torch.equal(G, rows)  # the caller's rows as they were (float64 too)
        reads: list[int] = []
        columns = store.columns

        def counted(start: int, stop: int, *args, **kwargs) -> torch.Tensor:
            reads.append(start)
            return columns(start, stop, *args, **kwargs)

        store.columns = counted
        streamed = fit(params, G, store, form=form, block_size=64,
                       max_memory_gb=4.5 * largest / 2**30)
        starts = [c.start for c in streamed.chunks]
        assert streamed.cache is None and len(starts) >= 3 and reads == starts
        weights = {n: p.detach().clone() for n, p in params.items()}
        ones = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        masks = []
        for cur in (reference, streamed):
            keep = GlobalAllocator().allocate(Obs().scores(weights, cur, None), ones, 0.7)
            masks.append({n: ~k for n, k in keep.items()})
        assert reads == starts  # scoring reads nothing
        for n in weights:
            assert torch.equal(masks[0][n], masks[1][n])
        a = reference.prune_update(masks[0], weights, mode)
        b = streamed.prune_update(masks[0], weights, mode)
        assert reads == starts + starts[::-1]
        for n in weights:
            torch.testing.assert_close(b[n], a[n], rtol=1e-12,
                                       atol=1e-12 * float(a[n].abs().max()))
        # the safeguard's change of the whole update: alpha * dw where kept, -w where pruned
        change = {n: torch.where(masks[0][n], -weights[n].double(), b[n]) for n in weights}
        fresh = fit(params, G, GradientStore.from_tensor(G), form=form, block_size=64)
        expected = fresh.quadratic({n: torch.where(masks[0][n], -weights[n].double(), a[n])
                                    for n in weights})  # computed from G: no update before
        assert streamed.quadratic(change) == pytest.approx(expected, rel=1e-12)
        assert reads == starts + starts[::-1]
        half = {n: 0.5 * t for n, t in change.items()}
        assert streamed.quadratic(half) == pytest.approx(reference.quadratic(half), rel=1e-12)
        assert reads == starts + starts[::-1] + starts
    assert not open_store_files()


def test_a_block_larger_than_the_budget_is_refused_with_numbers():
    params, G = gradients(MLPNet(), ["fc2.weight"], m=8)
    with pytest.raises(WfcoreError, match=r"fc2.weight\[0:800\].*needs .* GiB, more than"):
        fit(params, G, GradientStore.from_tensor(G), block_size="full", form="primal",
            max_memory_gb=1e-6)


def test_float32_solves_read_float64_chunks(monkeypatch):
    params, G = gradients(MLPNet(), ["fc3.weight"], m=16)  # float64 rows
    store = GradientStore.from_tensor(G)
    read: list[torch.dtype] = []
    columns = store.columns

    def spy(*args, **kwargs):
        out = columns(*args, **kwargs)
        read.append(out.dtype)
        return out

    monkeypatch.setattr(store, "columns", spy)
    cur = fit(params, G, store, dtype="float32", block_size=50)
    assert read and set(read) == {torch.float64}  # the chunks come as stored
    assert cur.diag.dtype == DTYPES["float32"]
    # the float32 solves agree with float64 ones to float32's precision
    reference = fit(params, G, GradientStore.from_tensor(G), dtype="float64", block_size=50)
    torch.testing.assert_close(cur.diag.double(), reference.diag, rtol=1e-5, atol=0)


# -- the pipeline: the store lives for one step; the plan comes first ----------------------

def prune(tmp_path: Path, *overrides: str) -> int:
    return cli.main(["-q", "prune", str(ROOT / "configs" / "mnist_mlpnet.yaml"),
                     f"output={tmp_path / 'run'}", "train.epochs=1", "fisher.num_grads=32",
                     "scheduler.sparsities=[0.5,0.9]", *overrides])


def test_on_disk_store_is_gone_after_each_step(tmp_path, monkeypatch):
    from wfcore.plugins import woodfisher

    seen = []
    fit_before = woodfisher.WoodFisher.fit

    def spy(self, problem):
        seen.append((problem.gradients.place, open_store_files()))
        return fit_before(self, problem)

    monkeypatch.setattr(woodfisher.WoodFisher, "fit", spy)
    store_dir = tmp_path / "store"
    assert prune(tmp_path, "fisher.store=disk", f"fisher.store_dir={store_dir}",
                 "fisher.reuse_dense=false") == 0
    assert [place for place, _ in seen] == ["disk", "disk"]
    assert all(len(files) == 1 for _, files in seen)  # one store at a time, while in use
    assert not open_store_files() and not list(store_dir.iterdir())
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert all(s["timings"]["gradients"] > 0 for s in report["steps"])
    # oneshot's dense fit kept for every target (one store) is gone when the run ends
    seen.clear()
    assert prune(tmp_path, "fisher.store=disk", f"fisher.store_dir={store_dir}",
                 "--force") == 0
    assert [place for place, _ in seen] == ["disk"]
    assert not open_store_files() and not list(store_dir.iterdir())


def test_a_step_reads_a_disk_store_twice_and_plans_that(tmp_path, monkeypatch):
    """The pipeline's step on a disk store: the fit reads every chunk once, the joint
    update once more (last to first), and the safeguard's record of the update reads
    nothing; the plan counts the two passes, one per stage, and report.json holds the
    planned seconds of each stage beside the measured ones."""
    reads = []
    columns = GradientStore.columns

    def counted(self, start, stop, *args, **kwargs):
        reads.append(start)
        return columns(self, start, stop, *args, **kwargs)

    monkeypatch.setattr(GradientStore, "columns", counted)
    assert prune(tmp_path, "fisher.store=disk", f"fisher.store_dir={tmp_path / 'store'}",
                 "scheduler.sparsities=[0.7]", "estimator.max_memory_gb=0.004",
                 "safeguard.enabled=false") == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    half = len(reads) // 2
    assert half >= 2 and reads == reads[:half] + reads[:half][::-1]
    assert reads[:half] == sorted(reads[:half])
    plan = report["plan"]
    assert plan["store_passes"] == 2.0 and plan["update_store_passes"] == 1.0
    assert set(plan["stages"]) == {"gradients", "estimate", "prune"}
    assert all(v > 0 for v in plan["stages"].values())
    assert all(report["steps"][0]["timings"][k] > 0 for k in plan["stages"])


@pytest.mark.parametrize("fault", [WfcoreError("bad block"), KeyboardInterrupt()])
def test_on_disk_store_is_gone_after_an_error_or_ctrl_c(tmp_path, monkeypatch, fault):
    from wfcore.plugins import woodfisher

    def failing(self, problem):
        assert len(open_store_files()) == 1
        raise fault

    monkeypatch.setattr(woodfisher.WoodFisher, "fit", failing)
    code = prune(tmp_path, "fisher.store=disk", f"fisher.store_dir={tmp_path / 'store'}")
    assert code == (2 if isinstance(fault, WfcoreError) else 130)
    assert not open_store_files() and not list((tmp_path / "store").iterdir())


@pytest.mark.parametrize("estimator, message", [
    ("diag_fisher", "plan: the peak working set .* GiB is more than the .* GiB of memory"),
    ("woodfisher", "woodfisher: the block of 500 weights at fc1.weight.* needs .* GiB")])
def test_a_plan_that_does_not_fit_is_refused_before_the_dense_model(tmp_path, capsys,
                                                                    estimator, message):
    cache = tmp_path / "cache"
    code = prune(tmp_path, "fisher.num_grads=100000000", "fisher.store=memory",
                 f"cache_dir={cache}", f"estimator.name={estimator}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.match(f"wfcore: error: {message}", err[0])
    assert not cache.exists()  # no dense model was trained


def test_plan_prints_the_store_and_the_time(capsys, tmp_path):
    code = cli.main(["plan", str(ROOT / "configs" / "mnist_mlpnet.yaml"),
                     f"output={tmp_path / 'run'}", "fisher.store=disk"])
    out = capsys.readouterr().out
    assert code == 0
    assert "gradient store: 0.121 GiB disk" in out and "estimated time of the step" in out
    assert "d=32,360" in out and "m=1000" in out


def test_plan_refuses_a_store_larger_than_the_disk(capsys, tmp_path):
    code = cli.main(["plan", str(ROOT / "configs" / "mnist_mlpnet.yaml"),
                     f"output={tmp_path / 'run'}", "fisher.num_grads=100000000",
                     "fisher.store=disk", "estimator.name=diag_fisher"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.match(r"wfcore: error: plan: the gradient store needs [\d,]+ bytes .* on disk "
                    r"in .*, [\d,]+ bytes .* free; use fewer fisher.num_grads", err[0])


@pytest.mark.slow
def test_plan_of_the_paper_setting_fits_and_a_larger_m_is_refused(capsys):
    config_path = str(ROOT / "configs" / "resnet50_imagenet_gradual.yaml")
    assert cli.main(["plan", config_path]) == 0
    out = capsys.readouterr().out
    assert "d=25,502,912" in out and "m=400" in out
    assert "gradient store: 19 GiB disk" in out and "estimated time of the step" in out
    assert cli.main(["plan", config_path, "fisher.num_grads=100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"needs [\d,]+ bytes .* [\d,]+ bytes .* free", err[0])


def test_the_plan_decides_the_store_once_and_the_step_follows_it(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from wfcore.fisher import plan

    fisher = OmegaConf.create({"num_grads": 8, "storage_dtype": "float16", "store": "auto",
                               "offload": True})
    monkeypatch.setattr(plan, "available_memory", lambda device="cpu": 2**40)
    planned = plan.plan_store(fisher, 100, torch.device("cpu"), tmp_path)
    assert (planned.place, planned.device, planned.pin, planned.shared, planned.nbytes) == \
        ("memory", "cpu", False, False, 8 * 100 * 2)
    monkeypatch.setattr(plan, "available_memory", lambda device="cpu": 0)  # later: no room
    with planned.open() as store:  # the step opens what was planned, not a new decision
        assert (store.place, store.dtype, store.m, store.d) == ("memory", torch.float16, 8, 100)
    assert plan.plan_store(fisher, 100, torch.device("cpu"), tmp_path).place == "disk"
    # the host-device rule: rows on the host with offload (pinned for a GPU), shared by the
    # ranks of one machine only there
    cuda = torch.device("cuda")
    assert plan.plan_store(fisher, 100, cuda, tmp_path, shared_host=True).pin
    assert plan.plan_store(fisher, 100, cuda, tmp_path, shared_host=True).shared
    fisher.offload = False
    on_gpu = plan.plan_store(fisher, 100, cuda, tmp_path, shared_host=True)
    assert (on_gpu.device, on_gpu.pin, on_gpu.shared) == ("cuda", False, False)
    on_cpu = plan.plan_store(fisher, 100, torch.device("cpu"), tmp_path, shared_host=True)
    assert (on_cpu.device, on_cpu.shared) == ("cpu", True)
