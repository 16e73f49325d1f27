"""structure.unit: head: a head's weights, the shrunk attention against the masked one,
its ONNX export, and a run that removes heads, fine-tunes, resumes and exports."""

from __future__ import annotations

import copy
from pathlib import Path

import onnxruntime as ort
import pytest
import reference
import torch
from test_structured import resumed_like_whole
from wfcore.export.onnx import torch_to_onnx
from wfcore.plugins.architectures import TinyViT

from wfcore import config
from wfcore.fisher.gradients import ParamLayout
from wfcore.group_obs import Diagonal, DualFisher
from wfcore.heads import PrunedMultiheadAttention, head_coordinates, head_groups, shrink_heads
from wfcore.masks import select_params
from wfcore.run import pipeline
from wfcore.structured import prune_heads

X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def tiny_vit(heads: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyViT((1, 28, 28), 10, 7, 32, 2, heads, 2)
    with torch.no_grad():  # biases that are not zero
        for m in model.modules():
            if isinstance(m, torch.nn.MultiheadAttention):
                m.in_proj_bias.uniform_(-0.3, 0.3)
                m.out_proj.bias.uniform_(-0.3, 0.3)
    return model.eval()


def test_head_coordinates_are_its_qkv_rows_and_out_proj_columns():
    model = tiny_vit()
    # one attention module's weights: d small enough for an explicit F^-1
    params = select_params(model, ["encoder.layers.1.self_attn.*_weight",
                                   "encoder.layers.1.self_attn.out_proj.weight"])
    layout = ParamLayout(params)
    group = head_groups(model)[1]
    attn = model.encoder.layers[1].self_attn
    d, E = attn.head_dim, attn.embed_dim
    every = head_coordinates(group, model, layout.offsets)
    reads = head_coordinates(group, model, layout.offsets, DualFisher.reads)
    assert [c.numel() for c in every] == [4 * d * E] * 4
    assert [c.numel() for c in reads] == [d * E] * 4
    for h in range(4):
        flags = torch.zeros(layout.d, dtype=torch.bool)
        flags[every[h]] = True
        t = layout.unflatten(flags)
        rows = t["encoder.layers.1.self_attn.in_proj_weight"].all(1).nonzero().flatten()
        want = torch.cat([torch.arange(h * d, (h + 1) * d) + s * E for s in range(3)])
        assert torch.equal(rows, want)
        cols = t["encoder.layers.1.self_attn.out_proj.weight"].all(0).nonzero().flatten()
        assert torch.equal(cols, torch.arange(h * d, (h + 1) * d))
        assert int(flags.sum()) == 4 * d * E  # nothing else
    # the group OBS score of a head against an explicit float64 inverse
    w = layout.flatten({n: p.detach() for n, p in params.items()}).double()
    G = torch.randn(20, layout.d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    F_inv = reference.inverse(reference.fisher(G, 0.1))
    want = torch.stack([0.5 * w[i] @ torch.linalg.solve(F_inv[i][:, i], w[i]) for i in reads])
    torch.testing.assert_close(DualFisher(G, 0.1).saliencies(w, reads), want, rtol=1e-7,
                               atol=1e-10)


@pytest.mark.parametrize("scorer", ["obs", "magnitude"])
def test_shrunk_attention_equals_masked_and_exports(scorer, tmp_path):
    model = tiny_vit()
    params = select_params(model, None)
    G = torch.randn(40, ParamLayout(params).d, generator=torch.Generator().manual_seed(2))
    score = DualFisher(G, 0.1) if scorer == "obs" else Diagonal()
    step = prune_heads(model, X, params, score, 0.3, shrink_model=False, min_keep=0.25)
    masked = model(X)
    removed = step.allocation.removed
    assert removed and all(len(h) <= 3 for h in removed.values())  # a floor of one head
    shrunk = copy.deepcopy(model)
    shrink_heads(shrunk, head_groups(shrunk), removed)
    for g, heads in removed.items():
        attn = dict(shrunk.named_modules())[head_groups(model)[g].root]
        assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 4 - len(heads)
        assert attn.in_proj_weight.shape == (3 * attn.num_heads * attn.head_dim, 32)
    torch.testing.assert_close(shrunk(X), masked, rtol=0, atol=1e-5)
    model.train()
    shrunk.train()  # the encoder's fused fast path off: the same numbers
    torch.testing.assert_close(shrunk(X), model(X), rtol=0, atol=1e-5)
    shrunk.eval()
    assert step.record()["predicted"]["flops_removed"] >= 0.3
    # the cost model counts the shrunk attention exactly (Linear, Conv, attention params)
    counted = sum(p.numel() for name, p in shrunk.named_parameters()
                  if "norm" not in name and name not in ("cls_token", "pos_embed"))
    shrunk_step = prune_heads(shrunk, X, select_params(shrunk, None), Diagonal(), 0.0)
    assert shrunk_step.counted["params"] == counted
    path = torch_to_onnx(shrunk, X[:1], tmp_path / "vit.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: X.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), shrunk(X).detach(), rtol=0, atol=1e-5)


def test_a_model_without_attention_is_refused():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with pytest.raises(Exception, match="structure.unit.*nn.MultiheadAttention"):
        prune_heads(model, X, select_params(model, None), Diagonal(), 0.3)


GRADUAL = Path(__file__).parents[1] / "configs" / "mnist_cnn_gradual.yaml"


def head_run(out: Path, resume: bool = False) -> dict:
    cfg = config.load(GRADUAL, [
        "model.name=vit_tiny", "model.options={dim: 32, heads: 4}", "train.epochs=2",
        "data.options.test_size=4000", "estimator.name=woodfisher", "fisher.num_grads=32",
        "structure.unit=head", "structure.target=params", "structure.min_keep=0.25",
        "scorer.update=joint", "scheduler.initial_sparsity=0.1",
        "scheduler.final_sparsity=0.2", "scheduler.start_epoch=1", "scheduler.end_epoch=3",
        "scheduler.freq=1", "scheduler.epochs=4", "scheduler.lr=0.01",
        "scheduler.lr_decay_start=3", "export={name: onnx}", f"output={out}"])
    return pipeline.run(cfg, resume=resume)


@pytest.mark.slow  # two gradual runs with fine-tuning
@pytest.mark.usefixtures("one_thread")
def test_gradual_head_run_fine_tunes_resumes_and_exports(tmp_path, monkeypatch):
    whole = head_run(tmp_path / "whole")
    params = [s["safeguard"][0]["structured"]["counted"]["params_removed_from_dense"]
              for s in whole["steps"]]
    assert params == sorted(params) and params[-1] >= 0.2
    numel, dense = resumed_like_whole(head_run, whole, tmp_path, monkeypatch)
    assert numel < dense
    assert whole["export"]["parity"]["max_abs_diff"] < 1e-4
