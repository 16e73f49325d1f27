"""INT8 export: pruned weights are integer zeros, top-1 holds, a missing piece is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from wfcore.export import bench, checks, quantize
from wfcore.export.onnx import OnnxOptions, conv_linear_weights, export_checked
from wfcore.plugins.models import MnistCNN

from wfcore import cli
from wfcore.errors import WfcoreError

ROOT = Path(__file__).parents[1]
INT8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory) -> Path:
    """mnist_cnn pruned to 90% by WoodFisher; the pipeline exports it with INT8."""
    run = tmp_path_factory.mktemp("cnn") / "run"
    code = cli.main(["-q", "prune", str(ROOT / "configs" / "mnist_cnn.yaml"), "train.epochs=4",
                     "scheduler.sparsities=[0.9]", "export.name=onnx", "export.quantize=int8",
                     f"output={run}"])
    assert code == 0
    return run


def int8_weights(path: Path) -> dict[tuple[int, ...], np.ndarray]:
    """{shape: int8 array} of the 8-bit initializers with at least 2 dimensions."""
    proto = onnx.load(str(path))
    return {tuple(i.dims): numpy_helper.to_array(i) for i in proto.graph.initializer
            if i.data_type in INT8 and len(i.dims) >= 2}


def test_int8_export_keeps_top1_within_half_a_point(cnn_run):
    export = json.loads((cnn_run / "report.json").read_text())["export"]
    assert export["sparsity"] == pytest.approx(0.9, abs=1e-3)
    quantized = export["quantized"]
    assert Path(quantized["path"]).name == "model.int8.onnx"
    assert quantized["calibration_samples"] == OnnxOptions().calibration_samples
    assert export["top1"] > 0.85  # the float export, on the 1,000 test images
    assert quantized["top1"] >= export["top1"] - 0.005, (quantized["top1"], export["top1"])
    assert export["dense"]["quantized"]["top1"] >= export["dense"]["top1"] - 0.005
    assert "int8" in (cnn_run / "report.md").read_text()


def test_every_pruned_weight_is_an_integer_zero(cnn_run):
    """Read independently of the checks: every layer of mnist_cnn has its own shape."""
    state = torch.load(cnn_run / "model_step0.pt", weights_only=True)
    weights = {n: w for n, w in state.items() if n.endswith("weight") and w.dim() >= 2}
    stored = int8_weights(cnn_run / "model.int8.onnx")
    assert len(stored) == len(weights) == 3
    pruned = 0
    for name, w in weights.items():
        shape = tuple(w.shape)
        q = stored[shape] if shape in stored else stored[shape[::-1]].T  # Gemm: (out, in)
        zero = (w == 0).numpy()
        assert (q[zero] == 0).all(), name
        pruned += int(zero.sum())
    assert pruned >= 0.9 * sum(w.numel() for w in weights.values()) - 1
    # The quantization is not a copy of the mask: kept weights are mostly non-zero integers.
    kept = sum(int((stored[tuple(w.shape)] != 0).sum()) for w in weights.values()
               if tuple(w.shape) in stored)
    assert kept > 0


def test_int8_file_is_checked_and_timed_beside_the_float_one(cnn_run, capsys):
    assert cli.main(["-q", "export", str(cnn_run), "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "model_step0.int8.onnx: INT8 for onnxruntime" in out and "top-1" in out
    report = json.loads((cnn_run / "report.json").read_text())
    assert Path(report["export"]["quantized"]["path"]).name == "model_step0.int8.onnx"
    timings = bench.bench([cnn_run / "model_step0.onnx", cnn_run / "model_step0.int8.onnx"],
                          dense=cnn_run / "dense.onnx", batch_size=4,
                          engines=["onnxruntime", "torch"], warmup=1, runs=3, min_seconds=0)
    seen = {(Path(t.model).name, t.engine) for t in timings}
    assert ("model_step0.int8.onnx", "onnxruntime") in seen
    assert ("model_step0.int8.onnx", "torch") not in seen  # no PyTorch INT8 counterpart
    assert all(t.speedup is not None for t in timings)


def test_a_pruned_weight_made_nonzero_fails_the_int8_check(cnn_run):
    proto = onnx.load(str(cnn_run / "model.int8.onnx"))
    state = torch.load(cnn_run / "model_step0.pt", weights_only=True)
    params = {n: state[n] for n in ("conv2.weight", "fc.weight")}
    quantize.check_quantized(proto, params)  # the file as written passes
    init = next(i for i in proto.graph.initializer
                if i.data_type in INT8 and tuple(i.dims) == tuple(state["conv2.weight"].shape))
    value = numpy_helper.to_array(init).copy()
    value.flat[np.flatnonzero(state["conv2.weight"].numpy() == 0)[3]] = 1
    init.CopyFrom(numpy_helper.from_array(value, init.name))
    with pytest.raises(WfcoreError, match=r"zero check failed: 1 weights .*conv2\.weight"):
        quantize.check_quantized(proto, params)


@pytest.mark.parametrize("layout", list(quantize.LAYOUTS))
def test_each_layout_keeps_zeros_and_runs_on_onnxruntime(tmp_path, layout):
    torch.manual_seed(0)
    model = MnistCNN().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in conv_linear_weights(model).values():
            w.mul_(torch.rand(w.shape, generator=g) >= 0.8)
    params = conv_linear_weights(model)
    export_checked(model, torch.randn(1, 1, 28, 28), tmp_path / "cnn.onnx")
    calibration = torch.randn(32, 1, 28, 28, generator=g).numpy()
    result = quantize.quantize_int8(tmp_path / "cnn.onnx", tmp_path / "cnn.int8.onnx",
                                    calibration, params, layout)
    zeros = result["zeros"]
    assert zeros["kept_zeros"] == zeros["torch_zeros"] > 0.75 * zeros["numel"]
    assert result["int8_weights"] >= sum(w.numel() for n, w in params.items()
                                         if n.startswith("conv"))
    assert result["calibration_samples"] == 32
    proto = onnx.load(str(tmp_path / "cnn.int8.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert ("DequantizeLinear" in ops) and (("QLinearConv" in ops) != (layout == "onnxruntime"))
    mapped = checks.map_weights(proto, params)
    assert set(mapped) == set(params)
    x = torch.randn(8, 1, 28, 28, generator=g)
    with torch.inference_mode():
        want = model(x).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "cnn.int8.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 0.1 * np.abs(want).max()  # INT8, not float32


def test_calibration_never_asks_for_more_samples_than_the_training_set():
    data = torch.utils.data.TensorDataset(torch.randn(10, 1, 4, 4), torch.zeros(10))
    assert quantize.calibration_inputs(data, 4).shape == (4, 1, 4, 4)
    with pytest.raises(WfcoreError, match="holds 10"):
        quantize.calibration_inputs(data, 11)


def test_a_missing_quantization_tool_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """Without ml_dtypes onnxruntime's quantization tools do not import."""
    for name in [m for m in sys.modules if m.startswith("onnxruntime.quantization")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    code = cli.main(["prune", str(ROOT / "configs" / "mnist_mlpnet.yaml"), "export.name=onnx",
                     "export.quantize=int8", f"output={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "quantization tools" in err and "ml_dtypes" in err
    assert not (tmp_path / "run" / "dense.pt").exists()  # refused before anything ran


def test_bad_quantize_options_name_the_key(tmp_path, capsys):
    code = cli.main(["prune", str(ROOT / "configs" / "mnist_mlpnet.yaml"), "export.name=onnx",
                     "export.quantize=int4", f"output={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "export" in err and "quantize" in err


def test_deepsparse_compiles_all_of_the_deepsparse_layout_and_none_of_qdq(tmp_path):
    """Why two layouts: DeepSparse 1.8 runs no QDQ graph itself (its bundled ONNX Runtime
    does), but all of the operator layout with per-tensor weights."""
    deepsparse = pytest.importorskip("deepsparse")
    torch.manual_seed(0)
    model = MnistCNN().eval()
    export_checked(model, torch.randn(1, 1, 28, 28), tmp_path / "cnn.onnx")
    calibration = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)).numpy()
    supported = {}
    for layout in quantize.LAYOUTS:
        path = tmp_path / f"cnn.{layout}.onnx"
        quantize.quantize_int8(tmp_path / "cnn.onnx", path, calibration,
                               conv_linear_weights(model), layout)
        engine = deepsparse.Engine(model=str(path), batch_size=1, num_cores=1)
        supported[layout] = engine.fraction_of_supported_ops
        del engine
    assert supported == {"onnxruntime": 0.0, "deepsparse": 1.0}
