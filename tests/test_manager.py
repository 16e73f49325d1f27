"""The plugin manager: inline plugins, duplicates, invalid hooks, registries."""

from __future__ import annotations

import pytest

import wfcore
from wfcore import manager
from wfcore.errors import ConfigError, PluginError


class ScorerPlugin:
    @wfcore.hookimpl
    def wfcore_scorers(self):
        return {"my_scorer": lambda options: "made"}


class ObsAgain:
    @wfcore.hookimpl
    def wfcore_scorers(self):
        return {"obs": lambda options: None}


class WrongArgument:
    @wfcore.hookimpl
    def wfcore_step_end(self, step, recrod, run_dir):  # misspelt argument
        pass


class UnknownHook:
    @wfcore.hookimpl
    def wfcore_scorer(self):  # no such hook (singular)
        return {}


class NotADict:
    @wfcore.hookimpl
    def wfcore_allocators(self):
        return ["global"]


def test_builtins_register_every_kind():
    plugins = manager.build()
    names = {kind: plugins.registry(kind).names() for kind in manager.KINDS}
    for kind, name in [("estimators", "magnitude"), ("scorers", "obs"), ("allocators", "global"),
                       ("allocators", "uniform"), ("schedulers", "oneshot"), ("models", "mlpnet"),
                       ("models", "mnist_cnn"), ("datasets", "mnist5k")]:
        assert name in names[kind]
    assert plugins.info["models"].source == "built-in"


def test_inline_plugin_registers_and_is_found():
    plugins = manager.build(extra_plugins=[("mine", ScorerPlugin())])
    entry, extra = plugins.registry("scorers").lookup("my_scorer", "scorer.name")
    assert entry.plugin == "mine" and extra == {}
    assert entry.factory(None) == "made"
    assert plugins.info["mine"].registers == {"scorers": ["my_scorer"]}


def test_duplicate_name_names_both_plugins():
    with pytest.raises(PluginError) as err:
        manager.build(extra_plugins=[("obs_again", ObsAgain())])
    msg = str(err.value)
    assert "'obs'" in msg and "'scorers'" in msg and "'obs_again'" in msg


def test_hook_with_wrong_argument_name_is_rejected():
    with pytest.raises(PluginError, match="wrong_arg.*recrod"):
        manager.build(extra_plugins=[("wrong_arg", WrongArgument())])


def test_unknown_hook_is_rejected():
    with pytest.raises(PluginError, match="wfcore_scorer"):
        manager.build(extra_plugins=[("unknown_hook", UnknownHook())])


def test_registration_must_return_a_dict():
    with pytest.raises(PluginError, match="not_a_dict.*must return a dict"):
        manager.build(extra_plugins=[("not_a_dict", NotADict())])


def test_unknown_name_lists_registered():
    plugins = manager.build()
    with pytest.raises(ConfigError) as err:
        plugins.registry("schedulers").lookup("nope", "scheduler.name")
    assert "scheduler.name" in str(err.value) and "oneshot" in str(err.value)


def test_prefix_names_pass_the_target():
    plugins = manager.build()
    entry, extra = plugins.registry("models").lookup("torchvision:resnet18", "model.name")
    assert entry.name == "torchvision:" and extra == {"target": "resnet18"}


def test_missing_config_plugin_module_names_the_key():
    with pytest.raises(PluginError, match="plugins.*no_such_module_xyz"):
        manager.build(["no_such_module_xyz"])


def test_event_hooks_are_called_with_keywords():
    seen = []

    class Listener:
        @wfcore.hookimpl
        def wfcore_run_end(self, report, run_dir):
            seen.append((report["name"], run_dir))

    plugins = manager.build(extra_plugins=[("listener", Listener())])
    plugins.hook.wfcore_run_end(report={"name": "x"}, run_dir="d", options={})
    assert seen == [("x", "d")]


class SeededPlugin:
    """Factories of every shape: with ``seed``, with ``**kwargs``, and without either."""

    made: list[tuple[str, object]] = []

    @wfcore.hookimpl
    def wfcore_scorers(self):
        from wfcore.plugins.scorers import Obs

        def with_seed(options, seed):
            SeededPlugin.made.append(("with_seed", seed))
            return Obs()

        def older(options):
            SeededPlugin.made.append(("older", None))
            return Obs()

        return {"with_seed": with_seed, "older": older}

    @wfcore.hookimpl
    def wfcore_datasets(self):
        from wfcore.plugins.datasets import fake

        def seeded_data(options, data, **kwargs):
            SeededPlugin.made.append(("seeded_data", kwargs.get("seed")))
            return fake(fake.Options(), data)

        return {"seeded_data": seeded_data}


def test_factories_get_the_run_seed_when_they_take_it():
    from pathlib import Path

    from wfcore import config
    from wfcore.run import pipeline, prepare

    plugins = manager.build(extra_plugins=[("seeded", SeededPlugin())])
    cfg = config.load(Path(__file__).parents[1] / "configs" / "mnist_mlpnet.yaml",
                      ["seed=7", "data.name=seeded_data"])
    SeededPlugin.made.clear()
    for name in ("with_seed", "older"):
        cfg.scorer = {"name": name}
        pipeline.instantiate(cfg, "scorer", plugins)
    prepare.load_data(cfg, plugins)
    assert SeededPlugin.made == [("with_seed", 7), ("older", None), ("seeded_data", 7)]


def test_accepts_seed_reads_the_signature():
    class WithSeed:
        def __init__(self, options, seed=0):
            pass

    assert manager.accepts_seed(WithSeed) and manager.accepts_seed(lambda o, **kw: None)
    assert not manager.accepts_seed(lambda options: None)
    assert not manager.accepts_seed(lambda options, seed, /: None)  # positional only
    assert not manager.accepts_seed(print)  # no signature


class OptionsPlugin:
    """Factories of every argument shape that ``Plugins.create`` must serve."""

    calls: list[tuple[str, tuple, dict]] = []

    @wfcore.hookimpl
    def wfcore_scorers(self):
        from dataclasses import dataclass

        @dataclass
        class Options:
            width: int = 2

            def validate(self) -> None:
                if self.width < 1:
                    raise ValueError("width must be >= 1")

        def plain(options):
            OptionsPlugin.calls.append(("plain", (options,), {}))
            return options

        def seeded(options, seed=0):
            OptionsPlugin.calls.append(("seeded", (options,), {"seed": seed}))
            return options

        def broken(options):
            raise RuntimeError("no such layer\nsecond line")

        plain.Options = seeded.Options = Options
        return {"plain": plain, "seeded": seeded, "broken": broken}

    @wfcore.hookimpl
    def wfcore_models(self):
        def model(options, num_classes, input_shape, target):
            OptionsPlugin.calls.append(("model", (num_classes, tuple(input_shape)),
                                        {"target": target}))
            return target

        return {"net:": model}


def test_create_looks_up_validates_and_calls_with_the_declared_arguments():
    plugins = manager.build(extra_plugins=[("options", OptionsPlugin())])
    OptionsPlugin.calls.clear()
    made = plugins.create("scorers", manager.Section.of({"name": "plain", "width": 3}, "scorer"),
                          seed=5)
    assert made.width == 3 and OptionsPlugin.calls[-1][2] == {}  # no seed: not declared
    plugins.create("scorers", manager.Section.of({"name": "seeded"}, "scorer"), seed=5)
    assert OptionsPlugin.calls[-1][1][0].width == 2 and OptionsPlugin.calls[-1][2] == {"seed": 5}
    section = manager.Section.nested({"name": "net:small", "options": {}}, "model")
    assert plugins.create("models", section, num_classes=3, input_shape=(1, 4), seed=0) \
        == "small"
    assert OptionsPlugin.calls[-1] == ("model", (3, (1, 4)), {"target": "small"})


@pytest.mark.parametrize("section, message", [
    ({"name": "plian"}, "scorer.name: unknown scorer 'plian' (did you mean 'plain'?)"),
    ({"name": "plain", "widht": 3}, "scorer.widht' (did you mean 'scorer.width'?) "
                                    "(scorer 'plain' of plugin 'options')"),
    ({"name": "plain", "width": 0}, "scorer: width must be >= 1 (scorer 'plain' of plugin "
                                    "'options')"),
    ({"name": "broken"}, "scorer.name: plugin 'options' failed to build 'broken': "
                         "RuntimeError: no such layer"),
])
def test_create_errors_are_one_line_naming_the_key_and_the_plugin(section, message):
    plugins = manager.build(extra_plugins=[("options", OptionsPlugin())])
    with pytest.raises((ConfigError, PluginError)) as info:
        plugins.create("scorers", manager.Section.of(section, "scorer"), seed=0)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_create_refuses_arguments_its_kind_does_not_declare():
    plugins = manager.build(extra_plugins=[("options", OptionsPlugin())])
    with pytest.raises(TypeError, match="missing.*num_classes"):
        plugins.create("models", manager.Section.nested({"name": "net:x"}, "model"),
                       input_shape=(1,))
    with pytest.raises(TypeError, match="unknown.*device"):
        plugins.create("scorers", manager.Section.of({"name": "plain"}, "scorer"), device="cpu")
