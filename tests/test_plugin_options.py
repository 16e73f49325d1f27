"""Event hooks with options (``wfcore_hooks``, ``hooks.<name>``); factories that fail."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from wfcore import cli, config, hookimpl, manager
from wfcore.errors import ConfigError, PluginError
from wfcore.run import pipeline

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "mnist_mlpnet.yaml"


@dataclass
class RecorderOptions:
    file: str = "events.jsonl"  # written in the run directory
    every: int = 1  # record every n-th step

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError("every must be at least 1")


@hookimpl
def wfcore_hooks():
    return {"recorder": RecorderOptions}


@hookimpl
def wfcore_step_end(step, record, run_dir, options):
    mine = options["recorder"]
    if step.index % mine.every == 0:
        with open(Path(run_dir) / mine.file, "a") as f:
            f.write(json.dumps({"step": step.index, "sparsity": record["sparsity"]}) + "\n")


@hookimpl
def wfcore_run_end(report, options):  # an implementation may take fewer arguments
    report["recorder_options"] = dict(vars(options["recorder"]))


PLUGINS = manager.build(extra_plugins=[("recorder", sys.modules[__name__])])


def prune(out: Path, *extra: str) -> dict:
    cfg = config.load(CONFIG, ["estimator.name=magnitude", "scheduler.sparsities=[0.5,0.7,0.9]",
                               f"output={out}", *extra])
    return pipeline.run(cfg, plugins=PLUGINS)


def test_hooks_receive_their_options_from_the_config(tmp_path):
    report = prune(tmp_path / "run", "hooks.recorder.file=steps.jsonl", "hooks.recorder.every=2")
    lines = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 2]
    assert report["recorder_options"] == {"file": "steps.jsonl", "every": 2}


def test_hooks_get_their_defaults_when_the_config_says_nothing(tmp_path):
    prune(tmp_path / "run", "scheduler.sparsities=[0.5]")
    assert len((tmp_path / "run" / "events.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("override, message", [
    ("hooks.recorder.fil=x", "hooks.recorder.fil"),
    ("hooks.recorder.every=0", "hooks.recorder: every must be at least 1"),
    ("hooks.recordr.file=x", "hooks.recordr: unknown hook 'recordr' (did you mean 'recorder'?)"),
])
def test_bad_hook_options_are_one_line_before_anything_runs(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        prune(tmp_path / "run", override)
    assert not (tmp_path / "run" / "dense.pt").exists()


def test_wfcore_options_and_config_show_a_hooks_options(monkeypatch, capsys):
    monkeypatch.setattr(manager, "build", lambda *args, **kwargs: PLUGINS)
    assert cli.main(["options", "hook", "recorder"]) == 0
    out = capsys.readouterr().out
    assert "file: str = events.jsonl  # written in the run directory" in out
    assert "every: int = 1  # record every n-th step" in out
    assert cli.main(["config", str(CONFIG), "hooks.recorder.every=3"]) == 0
    assert "recorder:\n    file: events.jsonl\n    every: 3" in capsys.readouterr().out


class Broken:
    """A model and a data set whose factories fail with a plain exception (a plugin bug)."""

    @hookimpl
    def wfcore_models(self):
        def model(options, num_classes, input_shape):
            raise RuntimeError("weights file is corrupt")
        return {"broken_model": model}

    @hookimpl
    def wfcore_datasets(self):
        def data(options, data):
            raise KeyError("split")
        return {"broken_data": data}


@pytest.mark.parametrize("override, message", [
    ("model.name=broken_model", "model.name: plugin 'broken' failed to build 'broken_model': "
                                "RuntimeError: weights file is corrupt"),
    ("data.name=broken_data", "data.name: plugin 'broken' failed to build 'broken_data': "
                              "KeyError: 'split'"),
])
def test_a_model_or_data_factory_that_fails_is_one_line_naming_the_plugin(tmp_path, override,
                                                                          message):
    plugins = manager.build(extra_plugins=[("broken", Broken())])
    cfg = config.load(CONFIG, [override, f"output={tmp_path / 'run'}"])
    with pytest.raises(PluginError) as err:
        pipeline.run(cfg, plugins=plugins)
    assert str(err.value) == message
