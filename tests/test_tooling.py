"""Plugin tooling and config help: options, config, suggestions, --disable, clashes, -q,
and the provenance of the dense-model cache."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

import wfcore
from wfcore import cli, config, manager, progress
from wfcore.run import pipeline

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "mnist_mlpnet.yaml"


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A directory on sys.path for plugin modules written by a test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("tooling_")]:
        del sys.modules[name]


def write_plugin(directory: Path, name: str, body: str) -> str:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def test_options_lists_defaults_and_comments(capsys):
    assert cli.main(["options", "estimator", "woodfisher"]) == 0
    out = capsys.readouterr().out
    for line in ("damp: float = 0.1  # relative", "damp_mode: str = relative",
                 "block_size: Union[int, str] = 500",
                 "form: str = auto  # auto", "dtype: str = float64  # dtype of the solves"):
        assert line in out
    assert cli.main(["options", "scorers", "obs"]) == 0
    assert "update: str = none" in capsys.readouterr().out


def test_options_of_an_unknown_name_suggests(capsys):
    assert cli.main(["options", "estimator", "woodfishr"]) == 2
    assert "did you mean 'woodfisher'?" in capsys.readouterr().err


@pytest.mark.parametrize("override, suggestion", [
    ("estimator.dampp=1", "'estimator.dampp' (did you mean 'estimator.damp'?)"),
    ("fisher.num_grad=3", "'fisher.num_grad' (did you mean 'fisher.num_grads'?)"),
    ("scorer.name=obz", "unknown scorer 'obz' (did you mean 'obs'?)"),
])
def test_unknown_keys_and_names_suggest_the_closest(tmp_path, capsys, override, suggestion):
    assert cli.main(["prune", str(CONFIG), override, f"output={tmp_path}/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and suggestion in err[0]


def test_config_prints_the_resolved_config(capsys):
    assert cli.main(["config", str(CONFIG), "estimator.name=kfac", "scorer.update=none"]) == 0
    cfg = config.OmegaConf.create(capsys.readouterr().out)
    assert cfg.estimator == {"name": "kfac", "damp": 0.001, "damp_mode": "absolute",
                             "damping": "factored", "batch_size": 256, "joint_max": 8192}
    assert cfg.scorer["update"] == "none" and cfg.fisher.num_grads == 1000


def test_overriding_model_or_data_name_drops_their_options(tmp_path):
    base = tmp_path / "c.yaml"
    base.write_text("model: {name: resnet20, options: {depth: 32}}\n"
                    "data: {name: fake, options: {train_size: 8}}\n")
    cfg = config.load(base, ["model.name=mlpnet", "data.name=mnist5k"])
    assert cfg.model.options == {} and cfg.data.options == {}
    kept = config.load(base, ["model.options.depth=44"])
    assert kept.model.options == {"depth": 44} and kept.data.options == {"train_size": 8}


CLASH = """
    import wfcore

    @wfcore.hookimpl
    def wfcore_scorers():
        return {"obs": lambda options: None}

    def wfcore_allocators():  # no @hookimpl: reported, ignored
        return {}
"""


def test_plugins_shows_a_clash_and_disable_makes_prune_work(plugin_dir, tmp_path, capsys):
    name = write_plugin(plugin_dir, "tooling_clash", CLASH)
    assert cli.main(["plugins", "--plugin", name]) == 0
    out = capsys.readouterr().out
    assert "clash: scorer 'obs' is registered by two plugins: 'scorers' and 'tooling_clash'" \
        in out
    assert "ignored: wfcore_allocators (no @wfcore.hookimpl)" in out
    run = [str(CONFIG), f"plugins=[{name}]", "train.epochs=1", "fisher.num_grads=8",
           "scheduler.sparsities=[0.5]", "estimator.name=magnitude", "scorer.update=none"]
    assert cli.main(["-q", "prune", *run, f"output={tmp_path}/a"]) == 2
    err = capsys.readouterr().err
    assert "registered by two plugins" in err and "--disable" in err
    assert cli.main(["-q", "--disable", name, "prune", *run, f"output={tmp_path}/b"]) == 0
    assert json.loads((tmp_path / "b" / "report.json").read_text())["finished"]


def test_disable_by_environment_skips_even_a_broken_plugin(plugin_dir, monkeypatch):
    name = write_plugin(plugin_dir, "tooling_broken", "raise RuntimeError('boom')\n")
    with pytest.raises(wfcore.errors.PluginError, match="tooling_broken"):
        manager.build([name])
    monkeypatch.setenv(manager.DISABLE_ENV, f"other,{name}")
    assert name not in manager.build([name]).info
    assert "kfac" not in manager.build(disable=["kfac"]).registry("estimators").names()


def test_quiet_switches_progress_bars_off(monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not progress.disabled(False)
    assert progress.disabled(True)
    assert cli.main(["-q", "options", "scorer", "obs"]) == 0
    assert progress.disabled(False)  # the CLI set tqdm's own switch
    monkeypatch.delenv("TQDM_DISABLE")


def test_dense_cache_key_follows_the_data_and_the_plugin_versions(monkeypatch):
    cfg = config.load(CONFIG, [])
    plugins = manager.build()
    data = pipeline.load_data(cfg, plugins)
    base = pipeline.dense_provenance(cfg, plugins, data)
    path = pipeline.dense_cache_path(cfg, base)
    assert pipeline.dense_cache_path(cfg, dict(base)) == path  # stable
    x, y = data.train[0]
    data.train = [(x + 1, y), *[data.train[i] for i in range(1, len(data.train))]]
    other = pipeline.dense_provenance(cfg, plugins, data)
    assert other["data"] != base["data"] and pipeline.dense_cache_path(cfg, other) != path
    plugins.info[base["data_plugin"].split()[0]].version = "9.9"
    assert pipeline.dense_provenance(cfg, plugins, data)["data_plugin"].endswith("9.9")
