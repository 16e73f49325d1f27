"""N:M patterns (structure.pattern): masks for every scorer, WoodFisher's joint update."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch.testing import assert_close
from wfcore.plugins.woodfisher import WoodFisher, WoodFisherOptions

from wfcore import config
from wfcore.errors import ConfigError
from wfcore.fisher.gradients import ParamLayout
from wfcore.interfaces import PruningProblem
from wfcore.masks import to_groups
from wfcore.nm import nm_keep, parse_pattern, pattern_holds


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 4 : 8") == (4, 8)
    assert parse_pattern(None) is None
    for bad in ("4:2", "2-4", "0:4", "2:2"):
        with pytest.raises(ConfigError, match="structure.pattern"):
            parse_pattern(bad)


def test_config_checks_the_pattern():
    with pytest.raises(ConfigError, match="structure.pattern"):
        config.load(None, ["structure.pattern='3:3'"])
    with pytest.raises(ConfigError, match="choose one"):
        config.load(None, ["structure.pattern='2:4'", "structure.block=4"])


@pytest.mark.parametrize("shape", [(6, 16), (4, 8, 3, 3), (5, 6), (3, 1, 5, 5)])
def test_nm_keep_keeps_the_best_n_of_every_m(shape):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(shape, generator=g, dtype=torch.float64)
    keep = torch.ones(shape, dtype=torch.bool)
    out = nm_keep({"w": s}, {"w": keep}, (2, 4))["w"]
    assert pattern_holds({"w": out}, (2, 4))
    groups, scores = to_groups(out, 4, False), to_groups(s, 4, -1.0)
    real = to_groups(torch.ones_like(keep), 4, False)
    # every group keeps min(n, its size), the highest scores of it
    assert torch.equal(groups.sum(-1), real.sum(-1).clamp(max=2))
    kept_min = torch.where(groups, scores, float("inf")).min(-1).values
    dropped_max = torch.where(real & ~groups, scores, float("-inf")).max(-1).values
    assert (kept_min > dropped_max).all()


def test_nm_keep_counts_pruned_weights_among_the_zeros():
    s = torch.arange(8.0).reshape(1, 8)
    keep = torch.ones(1, 8, dtype=torch.bool)
    keep[0, 3] = False  # pruned: it stays pruned, the best two of the others are kept
    out = nm_keep({"w": s}, {"w": keep}, (2, 4))["w"]
    assert out.tolist() == [[False, True, True, False, False, False, True, True]]


def test_woodfisher_joint_update_with_a_two_of_four_mask():
    """The joint OBS update inside each block under a 2:4 mask equals the dense-inverse
    reference, and leaves the pruned weights at exactly zero."""
    g = torch.Generator().manual_seed(3)
    shapes = {"w": (4, 8)}
    G = torch.randn(20, 32, generator=g, dtype=torch.float64)

    class Source:
        num_grads = 20
        layout = ParamLayout({"w": torch.empty(shapes["w"])})

        def sample(self):
            return G

    problem = PruningProblem(None, None, None, Source(), None,
                             torch.device("cpu")).with_gradients()
    cur = WoodFisher(WoodFisherOptions(damp=1e-3, damp_mode="absolute", block_size=8)).fit(
        problem)
    w = torch.randn(4, 8, generator=g, dtype=torch.float64)
    keep = nm_keep({"w": w.abs()}, {"w": torch.ones(4, 8, dtype=torch.bool)}, (2, 4))["w"]
    dw = cur.prune_update({"w": ~keep}, {"w": w}, "joint")["w"]
    for b in range(4):  # a block of 8 = one row
        F_inv = ref.inverse(ref.fisher(G[:, 8 * b:8 * b + 8], 1e-3))
        Q = (~keep[b]).nonzero().squeeze(1).tolist()
        assert_close(dw[b], ref.joint_update(F_inv, w[b], Q), rtol=1e-8, atol=1e-10)
    assert ((w + dw)[~keep].abs() < 1e-12).all()


def test_semi_structured_benchmark_runs_or_skips(capsys):
    """benchmarks/semi_structured.py: a speed check on CUDA, a one-line skip elsewhere."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "semi_structured.py"
    spec = importlib.util.spec_from_file_location("semi_structured", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not torch.cuda.is_available():
        assert module.main([]) == 0
        assert "skipped" in capsys.readouterr().out
        return
    assert module.main(["--sizes", "1024x1024", "--batch", "256", "--repeats", "5"]) == 0
    assert '"same_output": true' in capsys.readouterr().out
