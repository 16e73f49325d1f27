"""The Python API (wfcore.prune / export / bench) on model objects built here, and the same
models through the command line by file spec, with no plugin."""

from __future__ import annotations

import copy
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from user_models import build, build_transformer, digits

import wfcore
from wfcore import cli
from wfcore.masks import select_params

ROOT = Path(__file__).parents[1]
TRAIN, TEST = digits()
FAST = {"fisher": {"num_grads": 16}, "safeguard": {"calibration_samples": 64},
        "device": "cpu"}


def trained(model: torch.nn.Module, steps: int = 30) -> torch.nn.Module:
    """A few full-batch Adam steps on the digits: a model as a user brings it, trained."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, targets = TRAIN.tensors
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model.eval()


def zero_patterns(run_dir: Path) -> dict[str, str]:
    """A hash of the zeros of every weight, per saved step."""
    out = {}
    for path in sorted(run_dir.glob("model_step*.pt")):
        state = torch.load(path, weights_only=True)
        h = hashlib.sha256()
        for name in sorted(state):
            if name.endswith("weight"):
                h.update(name.encode() + (state[name] == 0).numpy().tobytes())
        out[path.name] = h.hexdigest()[:16]
    return out


@pytest.mark.parametrize("make", [build, build_transformer], ids=["cnn_bn_residual",
                                                                   "transformer"])
@pytest.mark.parametrize("method", ["woodfisher", "magnitude"])
def test_a_model_built_here_is_pruned_exported_and_checked_in_ten_lines(make, method,
                                                                        tmp_path, one_thread):
    model = trained(make(num_classes=10, input_shape=(1, 8, 8)))
    opset = 14 if make is build_transformer else 13  # attention (SDPA) needs opset 14
    # -- the user's code: ten lines at most ---------------------------------------------
    pruned, result = wfcore.prune(model, TRAIN.tensors, test=TEST, estimator=method,
                                  scheduler={"sparsities": [0.8, 0.9]}, quiet=True, **FAST)
    record = wfcore.export(pruned, tmp_path / "model.onnx", TRAIN.tensors[0][:1], quiet=True,
                           opset=opset)
    # -----------------------------------------------------------------------------------
    params = select_params(pruned, None)
    numel = sum(p.numel() for p in params.values())
    zeros = sum(int((p == 0).sum()) for p in params.values())
    assert [s["target_sparsity"] for s in result.steps] == [0.8, 0.9]
    for step in result.steps:  # the allocator's count: the nearest whole weight
        assert abs(step["sparsity"] * numel - step["target_sparsity"] * numel) < 1
        assert step["accuracy"] is not None and step["safeguard"] and step["layers"]
    assert zeros == round(result.sparsity * numel)  # the returned model is the last step
    assert record["zeros"]["kept_zeros"] == record["zeros"]["torch_zeros"] >= zeros
    assert record["parity"]["max_abs_diff"] <= record["parity"]["atol"]
    assert result.run_dir is None and result.plan and result.dense["source"] == "as built"
    # the model given is left as it was: a copy is pruned
    assert all(int((p == 0).sum()) == 0 for p in select_params(model, None).values())


def test_the_cli_with_a_file_spec_and_no_plugin_prunes_to_the_same_masks(tmp_path, monkeypatch,
                                                                       one_thread):
    monkeypatch.chdir(ROOT)
    model = trained(build(num_classes=10, input_shape=(1, 8, 8)))
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    settings = tmp_path / "settings.yaml"
    settings.write_text("estimator: {name: woodfisher}\nscheduler: {name: oneshot, "
                        "sparsities: [0.5, 0.9]}\nfisher: {num_grads: 16}\n"
                        "safeguard: {calibration_samples: 64}\ndevice: cpu\n")
    pruned, result = wfcore.prune(model, TRAIN.tensors, test=TEST, config=settings,
                                  output=tmp_path / "api", quiet=True)
    loaded = wfcore.load_model(tmp_path / "api")  # the run's last step, read back
    assert not loaded.training
    inputs = TEST.tensors[0]
    torch.testing.assert_close(loaded(inputs), pruned(inputs), rtol=0, atol=0)
    assert cli.main(["-q", "prune", str(settings), "model.name=tests/user_models.py:build",
                     f"model.checkpoint={tmp_path / 'dense.pt'}",
                     "data.name=tests/user_models.py:digits", f"output={tmp_path / 'cli'}"]) == 0
    api_masks, cli_masks = zero_patterns(tmp_path / "api"), zero_patterns(tmp_path / "cli")
    assert len(api_masks) == 2 and api_masks == cli_masks
    import json

    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert [s["accuracy"] for s in report["steps"]] == [s["accuracy"] for s in result.steps]


def test_an_api_run_directory_is_exported_and_resumed_by_the_command_line(tmp_path, monkeypatch,
                                                                          capsys, one_thread):
    plugin = tmp_path / "interrupt.py"
    plugin.write_text("import os\nimport wfcore\n\n\n@wfcore.hookimpl\n"
                      "def wfcore_step_end(step):\n"
                      "    if os.environ.get('STOP_AFTER') == str(step.index):\n"
                      "        raise KeyboardInterrupt\n")
    model = trained(build(num_classes=10, input_shape=(1, 8, 8)))
    config = {"plugins": [str(plugin)], "scheduler": {"sparsities": [0.5, 0.9]}, **FAST}
    wfcore.prune(model, TRAIN.tensors, test=TEST, config=config, output=tmp_path / "whole",
                 quiet=True)
    with pytest.raises(wfcore.WfcoreError, match=r"imports plugins \(.*interrupt.py\)"):
        wfcore.load_model(tmp_path / "whole", run_plugins=False)  # as bench reads a run
    monkeypatch.setenv("STOP_AFTER", "0")
    with pytest.raises(KeyboardInterrupt):
        wfcore.prune(model, TRAIN.tensors, test=TEST, config=config,
                     output=tmp_path / "cut", quiet=True)
    monkeypatch.delenv("STOP_AFTER")
    assert cli.main(["-q", "prune", "--resume", str(tmp_path / "cut")]) == 0
    assert zero_patterns(tmp_path / "cut") == zero_patterns(tmp_path / "whole")
    assert cli.main(["-q", "export", str(tmp_path / "cut")]) == 0
    assert "zeros kept" in capsys.readouterr().out
    assert (tmp_path / "cut" / "model_step1.onnx").is_file()


def test_the_readme_python_example_runs_verbatim(tmp_path, monkeypatch, capsys, one_thread):
    readme = (ROOT / "README.md").read_text()
    first_screen = readme[:readme.index("\n## ")]
    code = re.findall(r"```python\n(.*?)```", first_screen, re.S)
    assert code, "the README's first screen has no Python example"
    lines = [line for line in code[0].splitlines() if line.strip()]
    assert len(lines) <= 12
    # the README starts with its two commands (demo, tests), the example follows at once
    assert first_screen.index("make demo") < first_screen.index("make test") \
        < first_screen.index("```python")
    monkeypatch.chdir(tmp_path)
    exec(compile(code[0], "README.md", "exec"), {"__name__": "readme"})
    assert "| 1 | 70.00% | 70.00% |" in capsys.readouterr().out
    assert (tmp_path / "digits.onnx").is_file()


def test_quiet_prints_nothing(capfd):
    model = trained(build(num_classes=10, input_shape=(1, 8, 8)), steps=2)
    wfcore.prune(model, TRAIN.tensors, quiet=True, scheduler={"sparsities": [0.5]}, **FAST)
    assert capfd.readouterr() == ("", "")


def test_without_quiet_the_plan_steps_and_bars_are_shown_as_by_the_command():
    script = ("import torch, wfcore\n"
              "from user_models import build, digits\n"
              "train, _ = digits()\n"
              "_, result = wfcore.prune(build(10, (1, 8, 8)), train, device='cpu',\n"
              "    fisher={'num_grads': 8}, scheduler={'sparsities': [0.5]})\n"
              "assert result.accuracy is None and result.steps[0]['loss'] is None\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT / "tests", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "INFO wfcore.run.pipeline: plan: weights d=" in done.stderr
    assert "step 0: sparsity" in done.stderr and done.stdout == ""


def test_settings_are_validated_as_on_the_command_line():
    model = build(num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(wfcore.ConfigError, match="unknown config key 'fisher.num_grad'"):
        wfcore.prune(model, TRAIN.tensors, fisher__num_grad=3, quiet=True)
    with pytest.raises(wfcore.ConfigError, match="unknown estimator 'woodfishr'"):
        wfcore.prune(model, TRAIN.tensors, estimator="woodfishr", quiet=True)
    with pytest.raises(wfcore.ConfigError, match="fisher.num_grads': 0 is less than 1"):
        wfcore.prune(model, TRAIN.tensors, config=["fisher.num_grads=0"], quiet=True)
    with pytest.raises(wfcore.ConfigError, match="model.name: 'mlpnet' is set"):
        wfcore.prune(model, TRAIN.tensors, model__name="mlpnet", quiet=True)
    with pytest.raises(wfcore.WfcoreError, match="data: expected a Dataset"):
        wfcore.prune(model, [1, 2, 3], quiet=True)


def test_a_run_that_cannot_fit_is_refused_before_it_starts():
    model = build(num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(wfcore.WfcoreError, match="fisher.num_grads|does not fit|memory"):
        wfcore.prune(model, TRAIN.tensors, estimator="woodfisher", quiet=True,
                     fisher={"num_grads": 10**9}, device="cpu")


def test_a_dataloader_gives_its_batch_size_and_the_model_stays_given_with_inplace():
    from torch.utils.data import DataLoader

    model = trained(build(num_classes=10, input_shape=(1, 8, 8)), steps=2)
    before = copy.deepcopy(model.state_dict())
    pruned, result = wfcore.prune(model, DataLoader(TRAIN, batch_size=32), inplace=True,
                                  quiet=True, scheduler={"sparsities": [0.5]}, **FAST)
    assert pruned is model and result.config["data"]["batch_size"] == 32
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_given_model_is_trained_only_when_asked_and_then_not_cached(tmp_path):
    model = build(num_classes=10, input_shape=(1, 8, 8))
    args = dict(quiet=True, scheduler={"sparsities": [0.5]}, **FAST)
    _, result = wfcore.prune(model, TRAIN.tensors, config=["model.trained=false",
                                                           "train.epochs=1"], **args)
    assert result.dense["source"] == "trained (not cached)"
    with pytest.raises(wfcore.WfcoreError, match="test= and loss= go with data="):
        wfcore.prune(model, test=TEST, **args)
