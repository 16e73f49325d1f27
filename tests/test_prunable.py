"""The models users bring: what is prunable by default (attention in-projections, depthwise
and transposed convolutions), the ONNX opset chosen and checked before anything runs, the
zero check over every pruned parameter whatever op consumes it, and no silent degeneration.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from wfcore.export import checks, opsets
from wfcore.export.onnx import export_checked
from wfcore.plugins.architectures import TinyMobileNet, ViTOptions, vit_tiny

from wfcore import cli, prunable
from wfcore.errors import ConfigError, WfcoreError
from wfcore.masks import Masks, select_params
from wfcore.run.degenerate import DegeneracyCheck, collect_warnings

ROOT = Path(__file__).parents[1]


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return vit_tiny(ViTOptions(dim=16, heads=2, depth=1), 10, (1, 28, 28)).eval()


def prune_randomly(params: dict[str, torch.Tensor], sparsity: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in params.values():
            w.mul_(torch.rand(w.shape, generator=g) >= sparsity)


# -- what is prunable ------------------------------------------------------------------

def test_vit_prunes_its_attention_in_projection_by_default_and_out_proj_once():
    model = small_vit()
    params = select_params(model, None)
    assert list(params) == ["patch_embed.weight", "encoder.layers.0.self_attn.in_proj_weight",
                            "encoder.layers.0.self_attn.out_proj.weight",
                            "encoder.layers.0.linear1.weight", "encoder.layers.0.linear2.weight",
                            "head.weight"]
    info = prunable.summary(model, params)
    assert info["prunable"]["attention"] == {"tensors": 1, "numel": 3 * 16 * 16}
    assert info["prunable"]["linear"]["tensors"] == 4  # out_proj, linear1, linear2, head
    total = sum(p.numel() for p in model.parameters())
    assert info["share"] == pytest.approx(sum(p.numel() for p in params.values()) / total)
    reasons = {e["reason"]: e["names"] for e in info["excluded"]}
    assert reasons["bias (kept dense)"][0] == "patch_embed.bias"
    assert "cls_token" in reasons["not the weight of a known layer (select it with model.params)"]
    assert any("opt-in: add 'norm'" in r for r in reasons)
    lines = prunable.summary_lines(info)
    assert lines[0].startswith("prunable by model.prunable [linear, conv, conv_transpose, "
                               "attention]:") and "the sparsity is measured over these" in lines[0]


class Kinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.depthwise = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.conv1d = nn.Conv1d(3, 2, 1)
        self.norm = nn.BatchNorm2d(3)
        self.cross = nn.MultiheadAttention(4, 2, kdim=3, vdim=3)
        self.fc = nn.Linear(4, 2)


def test_kinds_select_every_layer_family_and_opt_ins():
    model = Kinds()
    default = select_params(model, None)
    assert set(default) == {"up.weight", "depthwise.weight", "conv1d.weight",
                            "cross.q_proj_weight", "cross.k_proj_weight", "cross.v_proj_weight",
                            "cross.out_proj.weight", "fc.weight"}
    more = select_params(model, None, ["linear", "embedding", "norm"])
    assert set(more) == {"embed.weight", "norm.weight", "cross.out_proj.weight", "fc.weight"}
    with pytest.raises(ConfigError, match="model.prunable.*'lstm' is not one of"):
        select_params(model, None, ["linear", "lstm"])
    with pytest.raises(ConfigError, match="model.params"):
        select_params(model, ["nothing.*"])


# -- the zero check over every pruned parameter ----------------------------------------

@pytest.fixture(scope="module")
def vit_export(tmp_path_factory):
    model = small_vit()
    params = {n: p.detach() for n, p in select_params(model, None).items()}
    prune_randomly(params, 0.7)
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    result = export_checked(model, torch.randn(1, 1, 28, 28), path, params=params)
    return model, params, result, path


def test_vit_exports_at_the_lowest_opset_and_every_pruned_parameter_is_checked(vit_export):
    _, params, result, path = vit_export
    assert result["opset"] == 14  # scaled_dot_product_attention: 13 cannot
    assert onnx.load(str(path)).opset_import[0].version == 14
    rows = {r["param"]: r for r in result["initializers"]}
    assert set(rows) == set(params) and result["untraced"] == []
    qkv = rows["encoder.layers.0.self_attn.in_proj_weight"]
    assert qkv["mapped_by"] in ("scope", "value") and qkv["torch_zeros"] > 0
    assert all(r["kept_zeros"] == r["torch_zeros"] for r in rows.values())
    assert result["zeros"]["torch_zeros"] == sum(int((p == 0).sum()) for p in params.values())


def test_a_zero_changed_to_1e3_in_the_qkv_initializer_fails_the_check(vit_export):
    _, params, result, path = vit_export
    proto = onnx.load(str(path))
    name = next(r["initializer"] for r in result["initializers"]
                if r["param"].endswith("in_proj_weight"))
    init = next(i for i in proto.graph.initializer if i.name == name)
    value = numpy_helper.to_array(init).copy()
    zero = tuple(np.argwhere(value == 0)[0])
    value[zero] = 1e-3
    init.CopyFrom(numpy_helper.from_array(value, name))
    lost = r"zero check failed: 1 weights .*self_attn.in_proj_weight \(1 of"
    with pytest.raises(WfcoreError, match=lost):
        checks.check_zeros(proto, params)


def test_the_int8_export_of_the_vit_checks_the_in_projection_too(vit_export, tmp_path):
    from wfcore.export import quantize

    _, params, _, path = vit_export
    calibration = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    result = quantize.quantize_int8(path, tmp_path / "vit.int8.onnx", calibration, params)
    rows = {r["param"]: r for r in result["initializers"]}
    assert set(rows) == set(params) and all(r["int8"] for r in rows.values())
    assert result["zeros"]["kept_zeros"] == result["zeros"]["torch_zeros"]


def test_a_parameter_split_in_transposed_blocks_is_traced_by_value_and_checked():
    """Q, K and V of a packed (3E, E) weight in three transposed initializers of other
    names (what constant folding of a sliced projection leaves): traced by value, on the
    non-zero weights, so a zero turned 1e-3 in one of them still fails the check."""
    from onnx import helper

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g) * (torch.rand(6, 4, generator=g) > 0.5)
    blocks = [w[:2].T, w[2:4].T, w[4:].T]
    inits = [numpy_helper.from_array(b.contiguous().numpy(), f"onnx::MatMul_{i}")
             for i, b in enumerate(blocks)]
    inits.append(numpy_helper.from_array(np.ones((4, 2), np.float32), "other"))
    proto = helper.make_model(helper.make_graph([], "g", [], [], initializer=inits))
    table = checks.check_zeros(proto, {"attn.in_proj_weight": w})
    row = table["rows"][0]
    assert row["mapped_by"] == "value" and row["initializers"] == [
        "onnx::MatMul_0", "onnx::MatMul_1", "onnx::MatMul_2"]
    assert row["kept_zeros"] == row["torch_zeros"] == int((w == 0).sum()) > 0
    middle = blocks[1].contiguous().numpy().copy()
    middle[np.nonzero(middle == 0)[0][0], np.nonzero(middle == 0)[1][0]] = 1e-3
    proto.graph.initializer[1].CopyFrom(numpy_helper.from_array(middle, "onnx::MatMul_1"))
    with pytest.raises(WfcoreError, match="zero check failed: 1 weights"):
        checks.check_zeros(proto, {"attn.in_proj_weight": w})


class CrossAttention(nn.Module):
    """Queries and keys/values from different tensors (the in-projection is sliced in the
    graph), and a transposed convolution."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.up = nn.ConvTranspose1d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # (batch, 6, 8)
        out = self.attn(x[:, :2], x, x)[0]  # (batch, 2, 8)
        return self.fc(self.up(out.transpose(1, 2)).mean(-1))


def test_split_in_projection_and_conv_transpose_are_traced_and_untraced_are_named(tmp_path):
    torch.manual_seed(0)
    model = CrossAttention().eval()
    params = {n: p.detach() for n, p in select_params(model, None).items()}
    prune_randomly(params, 0.5)
    result = export_checked(model, torch.randn(1, 6, 8), tmp_path / "x.onnx", params=params)
    rows = {r["param"]: r for r in result["initializers"]}
    assert set(rows) == set(params)
    assert rows["attn.in_proj_weight"]["kept_zeros"] == rows["attn.in_proj_weight"]["torch_zeros"]
    assert rows["up.weight"]["kept_zeros"] == rows["up.weight"]["torch_zeros"] > 0
    # a parameter the graph does not use is named, not passed over
    extra = {**params, "unused.weight": torch.ones(5, 7)}
    table = checks.sparsity_table(onnx.load(str(tmp_path / "x.onnx")), extra)
    assert table["untraced"] == ["unused.weight"]


# -- the opset, in the plan and on the command line ------------------------------------

def test_a_configured_opset_that_cannot_export_names_the_operator_and_the_opset():
    with pytest.raises(WfcoreError) as info:
        opsets.check_exportable(small_vit(), torch.randn(1, 1, 28, 28), 13)
    message = str(info.value)
    assert "\n" not in message
    assert "aten::scaled_dot_product_attention" in message and "export.opset=14" in message
    assert opsets.check_exportable(small_vit(), torch.randn(1, 1, 28, 28), None)[0] == 14


def run_vit(tmp_path: Path, *overrides: str) -> tuple[int, Path]:
    out = tmp_path / "run"
    code = cli.main(["-q", "prune", str(ROOT / "configs" / "mnist_mlpnet.yaml"),
                     "model.name=vit_tiny", "model.options={dim: 16, heads: 2, depth: 1}",
                     "train.epochs=1", "data.options.test_size=500", "fisher.num_grads=32",
                     "safeguard.calibration_samples=64",
                     "scheduler.name=oneshot", "scheduler.sparsities=[0.7]",
                     "export.name=onnx", f"output={out}", *overrides])
    return code, out


def test_vit_prunes_qkv_exports_without_an_opset_and_is_zero_checked(tmp_path, capsys):
    code, run = run_vit(tmp_path, "estimator.name=woodfisher", "estimator.block_size=64")
    assert code == 0
    report = json.loads((run / "report.json").read_text())
    layers = report["steps"][0]["layers"]
    assert layers["encoder.layers.0.self_attn.in_proj_weight"]["sparsity"] > 0.3
    assert report["prunable"]["prunable"]["attention"]["tensors"] == 1
    assert report["plan"]["notes"][-1].startswith("export: onnx, opset 14")
    export = report["export"]
    assert export["opset"] == 14 and export["untraced"] == []
    assert {r["param"] for r in export["initializers"]} == set(layers)
    assert export["zeros"]["kept_zeros"] == export["zeros"]["torch_zeros"] > 0
    assert export["parity"]["distinct_outputs"] is True
    # wfcore export RUN --opset overrides the run's choice
    assert cli.main(["-q", "export", str(run), "--opset", "15"]) == 0
    assert "opset 15" in capsys.readouterr().out
    assert cli.main(["-q", "export", str(run), "--opset", "13"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scaled_dot_product_attention" in err


def test_a_failed_export_is_one_line_and_leaves_a_finished_run(tmp_path, capsys, monkeypatch):
    from wfcore.export import onnx as onnx_exporter

    def fail(*args, **kwargs):
        raise WfcoreError("forced")

    monkeypatch.setattr(onnx_exporter, "export_checked", fail)
    code, run = run_vit(tmp_path, "estimator.name=magnitude")
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "export failed: forced" in err.splitlines()[-1]
    report = json.loads((run / "report.json").read_text())
    assert report["finished"] is True and report["export"]["error"] == "forced"
    assert "wfcore export" in (run / "report.md").read_text()
    monkeypatch.undo()
    assert cli.main(["-q", "export", str(run)]) == 0  # redone from the saved step
    assert json.loads((run / "report.json").read_text())["export"]["opset"] == 14


# -- no silent degeneration ------------------------------------------------------------

def test_an_emptied_layer_or_a_constant_output_is_a_warning_and_a_refusal():
    torch.manual_seed(0)
    model = TinyMobileNet(1, 10, 4).eval()
    params = select_params(model, None)
    masks = Masks(params)
    inputs = torch.randn(8, 1, 12, 12)
    check = DegeneracyCheck(inputs)
    check.dense(model)
    assert check.dense_varies is True
    depthwise = "blocks.0.0.weight"
    masks.set({depthwise: torch.zeros_like(masks.keep[depthwise])})
    with collect_warnings() as warned, pytest.raises(WfcoreError,
                                                     match="degenerate.allow_empty_layers"):
        check.check(model, masks, 0.9)
    assert "emptied 1 layer(s)" in warned[0] and depthwise in warned[0]
    # allowed: the warning stays; then a constant output (the head emptied, its bias zero)
    torch.manual_seed(0)
    model = TinyMobileNet(1, 10, 4).eval()
    masks = Masks(select_params(model, None))
    check = DegeneracyCheck(inputs, allow_empty_layers=True)
    check.dense(model)
    model.fc.bias.data.zero_()
    masks.set({"fc.weight": torch.zeros_like(masks.keep["fc.weight"])})
    with collect_warnings() as warned, pytest.raises(WfcoreError,
                                                     match="degenerate.allow_constant_output"):
        check.check(model, masks, 0.95)
    assert any("does not depend on its input" in w for w in warned)
    DegeneracyCheck(inputs, True, True).check(model, masks, 0.95)  # allowed: warnings only


def test_a_global_allocation_that_would_empty_a_layer_gets_the_floor_and_a_warning(
        tmp_path, capsys):
    """Magnitude on an untrained MobileNet-style net, one global threshold at 90%: it would
    empty layers, the default floor keeps them (a warning, in the report too). The result
    still answers every input alike (dead ReLUs behind the few weights left): refused by
    default, allowed here to look at it. With floor 0 the emptied layers are refused."""
    base = ["-q", "prune", str(ROOT / "configs" / "mnist_mlpnet.yaml"),
            "model.name=mobilenet_tiny", "model.options={width: 4}", "train.epochs=0",
            "data.options.test_size=500",
            "estimator.name=magnitude", "scorer.update=none", "safeguard.enabled=false",
            "scheduler.name=oneshot", "scheduler.sparsities=[0.9]"]
    assert cli.main([*base, f"output={tmp_path / 'refused'}"]) == 2
    assert "degenerate.allow_constant_output=true" in capsys.readouterr().err.splitlines()[-1]
    allowed = "degenerate.allow_constant_output=true"
    assert cli.main([*base, allowed, f"output={tmp_path / 'floor'}"]) == 0
    report = json.loads((tmp_path / "floor" / "report.json").read_text())
    step = report["steps"][0]
    assert all(v["sparsity"] < 1.0 for v in step["layers"].values())
    assert any("would empty" in w and "fc.weight" in w for w in step["warnings"])
    assert any("does not depend on its input" in w for w in step["warnings"])
    assert "## Warnings" in (tmp_path / "floor" / "report.md").read_text()
    capsys.readouterr()
    code = cli.main([*base, allowed, "allocator.floor=0", f"output={tmp_path / 'none'}"])
    assert code == 2
    assert "degenerate.allow_empty_layers=true" in capsys.readouterr().err.splitlines()[-1]
