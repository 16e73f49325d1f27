"""ONNX export: zeros kept through BN folding and transposes, parity, the CLI, the bench."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from wfcore.export import bench, checks, engines, provenance
from wfcore.export.onnx import OnnxOptions, conv_linear_weights, export_checked
from wfcore.plugins.models import MnistCNN, ResNet20

from wfcore import cli
from wfcore.errors import WfcoreError
from wfcore.run.report import export_table

ROOT = Path(__file__).parents[1]


def prune_randomly(model: nn.Module, sparsity: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Zero a random ``sparsity`` of every Conv/Linear weight; returns those weights."""
    g = torch.Generator().manual_seed(seed)
    weights = conv_linear_weights(model)
    with torch.no_grad():
        for w in weights.values():
            w.mul_(torch.rand(w.shape, generator=g) >= sparsity)
    return weights


def randomise_batchnorm(model: nn.Module, seed: int = 1) -> None:
    """Running statistics and affine terms far from the identity, so BN folding shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


@pytest.fixture(scope="module")
def resnet20_export(tmp_path_factory) -> tuple[nn.Module, dict, Path]:
    torch.manual_seed(0)
    model = ResNet20(3, 10).eval()
    randomise_batchnorm(model)
    prune_randomly(model, 0.8)
    path = tmp_path_factory.mktemp("r20") / "resnet20.onnx"
    result = export_checked(model, torch.randn(1, 3, 16, 16), path)
    return model, result, path


def test_scope_to_module():
    assert checks.scope_to_module("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert checks.scope_to_module("/layer2/layer2.0/shortcut/shortcut.0/Conv") \
        == "layer2.0.shortcut.0"
    assert checks.scope_to_module("/fc/Gemm") == "fc"


def test_mnist_cnn_export_keeps_zeros_and_matches(tmp_path):
    torch.manual_seed(0)
    model = MnistCNN().eval()
    weights = prune_randomly(model, 0.9)
    result = export_checked(model, torch.randn(1, 1, 28, 28), tmp_path / "cnn.onnx")
    want = sum(int((w == 0).sum()) for w in weights.values())
    assert result["zeros"]["torch_zeros"] == result["zeros"]["kept_zeros"] == want
    assert want > 0.85 * sum(w.numel() for w in weights.values())
    assert result["parity"]["max_abs_diff"] <= 1e-4
    proto = onnx.load(str(tmp_path / "cnn.onnx"))
    assert proto.opset_import[0].version == 13
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_resnet20_export_folds_batchnorm_and_keeps_zeros(resnet20_export):
    model, result, path = resnet20_export
    zeros = result["zeros"]
    assert zeros["kept_zeros"] == zeros["torch_zeros"] > 0.75 * zeros["numel"]
    assert result["parity"]["max_abs_diff"] <= 1e-4
    # The mapping is right, not merely shape-compatible: each folded initializer is the
    # PyTorch weight scaled per output channel by gamma / sqrt(var + eps) (float64).
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    rows = {r["param"]: r for r in result["initializers"]}
    bn_of = {"conv1.weight": model.bn1, "layer2.0.conv2.weight": model.layer2[0].bn2,
             "layer3.2.conv1.weight": model.layer3[2].bn1,
             "layer2.0.shortcut.0.weight": model.layer2[0].shortcut[1]}
    for name, bn in bn_of.items():
        w = dict(model.named_parameters())[name].detach().double()
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        expected = (w * scale.detach()[:, None, None, None]).numpy()
        got = inits[rows[name]["initializer"]]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert rows["fc.weight"]["mapped_by"] == "name"


def test_resnet20_parity_at_another_batch_size(resnet20_export):
    model, _, path = resnet20_export
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    parity = checks.check_parity(str(path), model, x, atol=1e-4)
    assert parity["batch"] == 5 and parity["max_abs_diff"] <= 1e-4


def test_a_zero_made_nonzero_in_the_onnx_file_fails_the_check(resnet20_export, tmp_path):
    model, result, path = resnet20_export
    proto = onnx.load(str(path))
    row = next(r for r in result["initializers"] if r["param"] == "layer1.1.conv2.weight")
    init = next(i for i in proto.graph.initializer if i.name == row["initializer"])
    value = numpy_helper.to_array(init).copy()
    value[np.unravel_index(np.flatnonzero(value == 0)[7], value.shape)] = 1e-3
    init.CopyFrom(numpy_helper.from_array(value, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    params = {n: p.detach() for n, p in conv_linear_weights(model).items()}
    with pytest.raises(WfcoreError, match=r"zero check failed: 1 weights .*layer1\.1\.conv2"):
        checks.check_zeros(onnx.load(str(broken)), params)
    checks.check_zeros(onnx.load(str(path)), params)  # the unbroken file passes


def test_parity_check_fails_on_another_model(resnet20_export):
    model, _, path = resnet20_export
    other = ResNet20(3, 10).eval()
    with pytest.raises(WfcoreError, match="parity check failed"):
        checks.check_parity(str(path), other, torch.randn(2, 3, 16, 16))


class TokenMLP(nn.Module):
    """A Linear on 3-d input without bias: exported as MatMul on the transposed weight."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6, bias=False)  # square: shape alone cannot tell W from W^T
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x))).sum(1)


def test_transposed_matmul_weight_is_mapped_and_checked(tmp_path):
    torch.manual_seed(0)
    model = TokenMLP().eval()
    with torch.no_grad():
        model.proj.weight.copy_(torch.randn(6, 6).triu())  # zeros below the diagonal only
    result = export_checked(model, torch.randn(1, 4, 6), tmp_path / "mlp.onnx")
    row = next(r for r in result["initializers"] if r["param"] == "proj.weight")
    assert row["torch_zeros"] == row["kept_zeros"] == 15
    mapped = checks.map_weights(onnx.load(str(tmp_path / "mlp.onnx")),
                                {"proj.weight": model.proj.weight.detach()})
    assert mapped["proj.weight"].transposed


def test_options_reject_old_opsets():
    with pytest.raises(ValueError, match="opset"):
        OnnxOptions(opset=11).validate()


def test_pipeline_export_and_cli_export_bench(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(["-q", "prune", str(ROOT / "configs" / "mnist_mlpnet.yaml"),
                     "train.epochs=1", "scheduler.name=oneshot", "scheduler.sparsities=[0.5,0.9]",
                     "export.name=onnx", "export.step=0", f"output={run}"])
    assert code == 0
    report = json.loads((run / "report.json").read_text())
    assert report["export"]["sparsity"] == pytest.approx(0.5, abs=1e-3)  # step 0, not the last
    assert report["export"]["dense"]["sparsity"] == 0.0
    assert (run / "model.onnx").is_file() and (run / "dense.onnx").is_file()
    for name, state, step in (("model.onnx", "model_step0.pt", "0"),
                              ("dense.onnx", "dense.pt", "dense")):  # as `wfcore export`'s
        meta = {p.key: p.value for p in onnx.load(str(run / name)).metadata_props}
        assert {"wfcore.run_dir": ".", "wfcore.state": state, "wfcore.step": step}.items() \
            <= meta.items()
        assert provenance.torch_model_for(run / name) is not None  # bench's torch row

    assert cli.main(["-q", "export", str(run)]) == 0  # default: the last step
    assert "sparsity 0.9000" in capsys.readouterr().out
    assert (run / "model_step1.onnx").is_file()
    half = tmp_path / "elsewhere" / "half.onnx"
    assert cli.main(["-q", "export", str(run), "--sparsity", "0.5", "-o", str(half)]) == 0
    assert "sparsity 0.5000" in capsys.readouterr().out
    assert half.is_file() and (half.parent / "dense.onnx").is_file()

    timings = bench.bench(run / "model_step1.onnx", dense=run / "dense.onnx", batch_size=4,
                          engines=["onnxruntime", "torch"], warmup=1, runs=3, min_seconds=0)
    assert {(Path(t.model).name, t.engine) for t in timings} == {
        (f, e) for f in ("model_step1.onnx", "dense.onnx") for e in ("onnxruntime", "torch")}
    dense_ort = next(t for t in timings if t.engine == "onnxruntime" and "dense" in t.model)
    assert dense_ort.speedup == 1.0
    assert all(t.runs >= 3 and t.median_ms > 0 for t in timings)


def test_bench_cli_one_line_errors(tmp_path, capsys):
    assert cli.main(["bench", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err
    junk = tmp_path / "model.onnx"
    junk.write_text("not a protobuf\n" * 10)
    assert cli.main(["bench", str(junk), "--engines", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an ONNX model" in err
    assert cli.main(["export", str(tmp_path)]) == 2
    assert "no model_step" in capsys.readouterr().err


def test_deepsparse_runs_the_sparse_export_in_this_process(tmp_path):
    """The one-environment decision: export, ONNX Runtime and DeepSparse side by side."""
    deepsparse = pytest.importorskip("deepsparse")
    torch.manual_seed(0)
    model = MnistCNN().eval()
    prune_randomly(model, 0.9)
    path = tmp_path / "cnn.onnx"
    export_checked(model, torch.randn(1, 1, 28, 28), path)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    engine = deepsparse.Engine(model=str(path), batch_size=4)
    got = engine.run([x.numpy()])[0]
    with torch.inference_mode():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_an_engine_not_installed_is_skipped_with_how_to_install(tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    path = tmp_path / "cnn.onnx"
    export_checked(MnistCNN().eval(), torch.randn(1, 1, 28, 28), path)
    monkeypatch.setattr(bench, "installed", lambda engine: engine != "deepsparse")
    with caplog.at_level("WARNING", logger="wfcore.export.bench"):
        timings = bench.bench(path, batch_size=2, engines=["deepsparse", "onnxruntime"],
                              warmup=1, runs=2, min_seconds=0)
    assert [t.engine for t in timings] == ["onnxruntime"]
    assert timings[0].speedup is None  # no dense model given
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 1 and "deepsparse: not installed, skipped" in skipped[0]
    assert "pip install 'wfcore[deepsparse]'" in skipped[0]


def test_a_failed_check_leaves_no_file_under_the_requested_name(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise WfcoreError("ONNX parity check failed: forced")

    monkeypatch.setattr(checks, "check_parity", fail)
    with pytest.raises(WfcoreError, match=r"cnn\.onnx: ONNX parity check failed: forced"):
        export_checked(MnistCNN().eval(), torch.randn(1, 1, 28, 28), tmp_path / "cnn.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.failed.onnx"]
    monkeypatch.undo()
    export_checked(MnistCNN().eval(), torch.randn(1, 1, 28, 28), tmp_path / "cnn.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


def test_a_worker_process_that_dies_is_one_line_and_this_process_goes_on(tmp_path):
    # DeepSparse 1.8 aborts the process on some sparse INT8 graphs: bench times it in a
    # process of its own, kept warm across rounds, so that the abort costs one row, not the run.
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    export_checked(MnistCNN().eval(), torch.randn(1, 1, 28, 28), path)
    worker = engines.Worker("onnxruntime on m.onnx", "onnxruntime", str(path), (2, 1, 28, 28), 1)
    try:
        assert worker.time(2) > 0 and worker.time(1) > 0  # the same warm engine, twice
        os.kill(worker._proc.pid, signal.SIGABRT)
        with pytest.raises(WfcoreError, match=r"^onnxruntime on m.onnx: the process ended "
                                              r"\(killed by SIGABRT\) before it finished$"):
            worker.time(1)
    finally:
        worker.close()
    with pytest.raises(WfcoreError, match=r"^x: .*missing"):
        engines.Worker("x", "onnxruntime", str(tmp_path / "missing.onnx"), (2, 4), 1)


def test_the_reason_of_a_native_abort_is_its_assertion_line():
    said = "DeepSparse\nThread: 0x7f\n\nAssertion at ./src/pool.hpp:333\n\nBacktrace:\n 0# .."
    assert engines.last_words(said) == "; Assertion at ./src/pool.hpp:333"
    assert engines.last_words("nothing to say\n") == ""


def test_report_shows_the_result_of_an_exporter_without_the_onnx_keys():
    rows = export_table({"path": "/run/model.pt", "max_abs_diff": 0.0,
                                "dense": {"max_abs_diff": 0.0}}).splitlines()
    assert rows[2:] == ["| model.pt | float32 | - | - | - |", "| - | float32 | - | - | - |"]
    onnx = {"path": "m.onnx", "sparsity": 0.5, "zeros": {"kept_zeros": 3, "torch_zeros": 3}}
    assert export_table(onnx).splitlines()[2] == "| m.onnx | float32 | 50.00% | 3/3 | - |"
