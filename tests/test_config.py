"""Config loading and validation: every user error names its key, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from wfcore import cli, config, manager
from wfcore.errors import ConfigError
from wfcore.run import pipeline

CONFIG = Path(__file__).parents[1] / "configs" / "mnist_mlpnet.yaml"


def load(*overrides: str):
    return config.load(CONFIG, list(overrides))


def test_defaults_and_overrides():
    cfg = load("train.lr=0.1", "scheduler.sparsities=[0.5,0.6]")
    assert cfg.train.lr == 0.1
    assert list(cfg.scheduler.sparsities) == [0.5, 0.6]
    assert cfg.model.name == "mlpnet"


@pytest.mark.parametrize("override, key", [
    ("foo=1", "'foo'"),
    ("model.nme=x", "'model.nme'"),
    ("train.lr=abc", "'train.lr'"),
    ("fisher.labels=maybe", "'fisher.labels'"),
    ("train.optimizer=lbfgs", "'train.optimizer'"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load(override)


def test_component_options_are_validated_against_the_plugin():
    plugins = manager.build()
    with pytest.raises(ConfigError, match="'scorer.updaet'"):
        pipeline.instantiate(load("scorer.updaet=joint"), "scorer", plugins)
    with pytest.raises(ConfigError, match="scorer.*update.*none, independent, joint"):
        pipeline.instantiate(load("scorer.update=both"), "scorer", plugins)
    with pytest.raises(ConfigError, match="'scheduler.sparsities'"):
        pipeline.instantiate(load("scheduler.sparsities=abc"), "scheduler", plugins)
    scorer = pipeline.instantiate(load("scorer.update=independent"), "scorer", plugins)
    assert scorer.options.update == "independent"


def test_component_needs_a_name():
    with pytest.raises(ConfigError, match="'allocator' needs a 'name'"):
        load("allocator.name=null")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found.*nope.yaml"):
        config.load(tmp_path / "nope.yaml")


def test_digest_is_stable_and_sensitive():
    a, b = load(), load("train.lr=0.2")
    assert config.digest(a.train) == config.digest(load().train)
    assert config.digest(a.train) != config.digest(b.train)


@pytest.mark.parametrize("override, expected", [
    ("scheduler.name=nope", "oneshot"),
    ("estimator.nmae=x", "estimator.nmae"),
])
def test_cli_prints_one_line_without_traceback(override, expected, capsys, tmp_path):
    code = cli.main(["prune", str(CONFIG), override, f"output={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_switching_a_component_drops_the_old_components_options():
    cfg = load("estimator.name=magnitude", "scorer.name=obs")
    assert dict(cfg.estimator) == {"name": "magnitude"}
    assert cfg.scorer["update"] == "joint"  # same scorer: the file's options stay
    cfg = load("estimator.damp=1e-3", "estimator.name=kfac")
    assert dict(cfg.estimator) == {"name": "kfac", "damp": 1e-3}
    cfg = load("estimator.damp=1e-3")
    assert cfg.estimator.name == "woodfisher" and cfg.estimator.block_size == 500


@pytest.mark.parametrize("key", list(config.CHOICES))
def test_each_choice_is_checked_and_described(key):
    """Every name a choice setting takes is in the schema's comment beside it (the docs
    are made from those) and loads; a name outside the list is refused naming the key."""
    import dataclasses

    section, name = key.split(".")
    schema = {f.name: f.type for f in dataclasses.fields(config.Config)}[section]
    schema = getattr(config, schema) if isinstance(schema, str) else schema
    comment = {row[0]: row[3] for row in config.describe_options(schema)}[name]
    for value in config.CHOICES[key]:
        assert value in comment, f"{key}: '{value}' is not described"
        assert config.load(None, [f"{key}={value}"])[section][name] == value
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config.load(None, [f"{key}=not_a_choice"])
