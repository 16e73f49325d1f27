"""Every check that can fail a run comes before ``--force`` removes anything and before
the dense model is trained (issue 25, cases 1 and 3): the plan's admission
(``wfcore/run/admission.py``) and its memory check, ``structure.block``'s group blocks
included. MLPNet: 784-40-20-10, 32,360 prunable weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_checks import fails
from torch import nn
from wfcore.plugins.allocators import GlobalAllocator, GlobalOptions, ManualAllocator, ManualOptions
from wfcore.plugins.kfac import Kfac, KfacOptions

from wfcore.errors import WfcoreError
from wfcore.fisher import plan, shared_store
from wfcore.fisher.gradients import ParamLayout
from wfcore.masks import block_scores, group_size, to_groups
from wfcore.run import directory as rundir
from wfcore.run import prepare

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "mnist_mlpnet.yaml")
FAST = ["train.epochs=1", "fisher.num_grads=16", "scheduler.name=oneshot",
        "safeguard.enabled=false"]
MAGNITUDE = ["estimator.name=magnitude", "scorer.update=none"]


def finished_run(out: Path) -> dict[str, bytes]:
    """A run directory holding a finished run, as --force would replace."""
    out.mkdir()
    rundir.claim(out)
    (out / "report.json").write_text(json.dumps({"finished": True, "config": {}, "steps": []}))
    (out / "model_step0.pt").write_bytes(b"the earlier run's step")
    (out / "accuracy_vs_sparsity.png").write_bytes(b"the earlier run's plot")
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.fixture
def untrained(monkeypatch, tmp_path):
    """No dense model may be trained: the cache is empty and training fails the test."""
    def train(*args, **kwargs):
        raise AssertionError("the dense model was trained before the run was refused")

    monkeypatch.setattr(prepare, "train", train)
    return f"cache_dir={tmp_path / 'cache'}"


def refused(capsys, tmp_path: Path, cache: str, *overrides: str) -> str:
    out = tmp_path / "run"
    before = finished_run(out)
    line = fails(capsys, "prune", CONFIG, *FAST, *overrides, cache, f"output={out}", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != rundir.LOCK} == before
    assert not (tmp_path / "cache").exists()
    assert not list(tmp_path.rglob(shared_store.PREFIX + "*"))  # no gradient store left
    assert not list(Path("/dev/shm").glob(shared_store.prefix() + "*"))
    return line


@pytest.mark.parametrize(("overrides", "said"), [
    (["allocator.floor=0.5", "scheduler.sparsities=[0.5,0.9]"],
     "allocator 'global': sparsity 0.9 needs 29124 of 32360 weights pruned, but the floors "
     "and excluded layers allow at most 16180"),
    (["allocator.floors={nomatch*: 0.5}"], "config key 'allocator.floors': 'nomatch*' matches"),
    (["allocator.exclude=[fc*]"], "allow at most 0"),
    (["allocator.exclude=[nomatch*]"], "config key 'allocator.exclude': 'nomatch*' matches"),
    (["allocator.name=manual", "allocator.sparsities={nomatch*: 0.5}"],
     "config key 'allocator.sparsities': 'nomatch*' matches"),
    (["allocator.name=manual", "allocator.sparsities={fc1*: 0.99}",
      "scheduler.sparsities=[0.5]"], "allocator 'manual': sparsity 0.5 needs 16180 zeros"),
    (["estimator.name=kfac", "estimator.joint_max=0"], "joint_max must be >= 1, got 0"),
])
def test_an_allocator_or_estimator_that_would_fail_at_step_0_is_refused_first(
        tmp_path, capsys, untrained, overrides, said):
    extra = [] if any(o.startswith("estimator") for o in overrides) else MAGNITUDE
    assert said in refused(capsys, tmp_path, untrained, *extra, *overrides)


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_store_dir_that_cannot_hold_the_store_is_refused_first(tmp_path, capsys, untrained,
                                                                 where):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    store = a_file if where == "a file" else a_file / "store"
    line = refused(capsys, tmp_path, untrained, "fisher.store=disk", f"fisher.store_dir={store}")
    assert f"config key 'fisher.store_dir': {a_file} is not a directory" in line
    assert a_file.read_text() == "mine\n"


def test_the_store_dir_is_probed_without_leaving_a_file(tmp_path):
    from wfcore.fisher.store import check_directory

    check_directory(tmp_path)
    check_directory(tmp_path / "not" / "yet")
    assert list(tmp_path.iterdir()) == []


def test_group_blocks_that_do_not_fit_are_refused_in_one_line(tmp_path, capsys, untrained,
                                                              monkeypatch):
    monkeypatch.setattr(plan, "available_memory", lambda device="cpu": 2**30)
    line = refused(capsys, tmp_path, untrained, "structure.block=512")
    assert "plan: structure.block=512: the group blocks [F^-1]_GG need" in line
    assert "use a smaller structure.block" in line


def mlp() -> dict[str, nn.Parameter]:
    return {"fc1": nn.Parameter(torch.zeros(40, 784)), "fc2": nn.Parameter(torch.zeros(20, 40)),
            "bias": nn.Parameter(torch.zeros(10))}


def test_group_blocks_are_capped_at_the_input_channels():
    params = mlp()
    assert [group_size(p.shape, 1000000) for p in params.values()] == [784, 40, 1]
    # entries: fc1 one group of 784 a row, fc2 one of 40, the bias one a weight
    assert plan.group_entries(params, 1000000) == 40 * 784**2 + 20 * 40**2 + 10
    # blocks of 512: fc1's rows in two groups, the second padded to 512
    assert plan.group_entries(params, 512) == 40 * 2 * 512**2 + 20 * 40**2 + 10
    assert plan.group_entries(params, 1) == 40 * 784 + 20 * 40 + 10


def test_a_capped_block_scores_as_the_padded_one():
    torch.manual_seed(0)
    s, keep = torch.rand(6, 5), torch.rand(6, 5) > 0.3
    capped = block_scores({"w": s}, {"w": keep}, 64)["w"]
    assert to_groups(s, 64).shape == (6, 1, 5)  # one group of the row, no padding
    padded = torch.where(to_groups(keep, 64, False, cap=False),
                         to_groups(s.double(), 64, cap=False), 0.0).sum(-1)
    mean = padded / to_groups(keep, 64, False, cap=False).sum(-1).clamp(min=1)
    assert torch.allclose(capped, mean.expand(6, 5).to(capped.dtype))


def test_the_plan_counts_the_group_blocks():
    """Blocks of 1 and 4 planned differently on a convolution (WoodFisher's curvature
    gives the blocks; magnitude's does not)."""
    from omegaconf import OmegaConf
    from wfcore.plugins.magnitude import Magnitude
    from wfcore.plugins.woodfisher import WoodFisher

    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.LazyLinear(10))
    example = torch.zeros(1, 16, 8, 8)
    model(example)
    params = {n: p for n, p in model.named_parameters() if p.dim() > 1}
    fisher = OmegaConf.create({"num_grads": 8, "grad_batch": 1, "storage_dtype": "float32",
                               "store": "memory", "offload": False})

    def peak(estimator, block: int) -> int:
        return plan.make_plan(model=model, params=params, example=example,
                              target=torch.zeros(1, dtype=torch.long),
                              loss_fn=nn.CrossEntropyLoss(), estimator=estimator,
                              estimator_name="x", needs_gradients=True, fisher=fisher,
                              store_dir=".", device=torch.device("cpu"), calibrate=False,
                              block=block).peak_bytes

    one, four = peak(WoodFisher(), 1), peak(WoodFisher(), 4)
    entries = plan.group_entries(params, 4)
    assert four - one == entries * plan.GROUP_ENTRY_BYTES
    assert peak(Magnitude(), 4) == peak(Magnitude(), 1)


def test_allocator_admission_without_a_model():
    sizes = {"a": 1000, "b": 100}
    GlobalAllocator(GlobalOptions(floor=0.1)).admit(sizes, [0.9])
    with pytest.raises(WfcoreError, match="allow at most 990"):
        GlobalAllocator(GlobalOptions(floor=0.1)).admit(sizes, [0.5, 0.91])
    with pytest.raises(WfcoreError, match="allow at most 99"):
        GlobalAllocator(GlobalOptions(floor=0.01, exclude=["a"])).admit(sizes, [0.1])
    ManualAllocator(ManualOptions(sparsities={"a": 0.5})).admit(sizes, [0.5])
    with pytest.raises(WfcoreError, match="other 100 weights would need"):
        ManualAllocator(ManualOptions(sparsities={"a": 0.1})).admit(sizes, [0.5])


def test_kfac_plans_the_joint_system_it_can_solve():
    """A joint_max above half the largest layer costs no more than that half."""
    layout = ParamLayout({"w": nn.Parameter(torch.zeros(10, 20))})
    big = Kfac(KfacOptions(joint_max=10**6)).cost(layout, 8, "cpu").working_bytes
    fit = Kfac(KfacOptions(joint_max=100)).cost(layout, 8, "cpu").working_bytes
    assert big == fit < 2**20
