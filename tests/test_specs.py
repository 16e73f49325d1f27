"""Models, data sets and plugins from files (wfcore.specs), whole-module checkpoints,
imagefolder's channels and timm models: each resolved where the docs say, each mistake a
one-line error that says where it looked."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from user_models import SmallCNN

from wfcore import config, manager, specs
from wfcore.errors import ConfigError, PluginError, WfcoreError
from wfcore.run import prepare

ROOT = Path(__file__).parents[1]
MODELS = ROOT / "tests" / "user_models.py"


def load(tmp_path: Path, text: str, *overrides: str):
    path = tmp_path / "cfg" / "run.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    cfg = config.load(path, list(overrides))
    return cfg, manager.build(cfg.plugins, base_dir=cfg.base_dir)


def test_a_file_spec_resolves_against_the_config_folder_first(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "nets").mkdir(parents=True)
    (tmp_path / "cfg" / "nets" / "mine.py").write_text(MODELS.read_text())
    monkeypatch.chdir(tmp_path)  # nets/mine.py is not here, only beside the config
    cfg, plugins = load(tmp_path, """
        model: {name: "nets/mine.py:build", options: {width: 4}}
        data: {name: "nets/mine.py:digits", options: {train_size: 32, test_size: 16}}
    """)
    data = prepare.load_data(cfg, plugins)
    assert (len(data.train), len(data.test), data.num_classes, data.input_shape) == \
        (32, 16, 10, (1, 8, 8))
    model = prepare.build_model(cfg, plugins, data)
    assert model.stem[0].out_channels == 4 and model.head.out_features == 10
    provenance = prepare.dense_provenance(cfg, plugins, data)
    assert str(tmp_path / "cfg" / "nets" / "mine.py") in provenance["model_plugin"]


def test_a_missing_file_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, plugins = load(tmp_path, "model: {name: 'nope.py:build'}\ndata: {name: digits}\n")
    with pytest.raises(ConfigError) as err:
        prepare.build_model(cfg, plugins, prepare.load_data(cfg, plugins))
    assert str(err.value) == (f"model.name: file not found: nope.py (looked in "
                              f"{tmp_path / 'cfg'}, {tmp_path})")


def test_a_missing_function_and_a_bad_option_are_one_line_errors(tmp_path):
    spec = f"{MODELS}:buidl"
    cfg, plugins = load(tmp_path, "data: {name: digits}\n", f"model.name={spec}")
    data = prepare.load_data(cfg, plugins)
    with pytest.raises(ConfigError, match="has no function 'buidl'; its functions: build, "):
        prepare.build_model(cfg, plugins, data)
    cfg, plugins = load(tmp_path, "data: {name: digits}\n", f"model.name={MODELS}:build",
                        "model.options.wdth=3")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.options.wdth' \(did you "
                                          r"mean 'model.options.width'\?\)"):
        prepare.build_model(cfg, plugins, data)
    cfg, plugins = load(tmp_path, "data: {name: digits}\n", f"model.name={MODELS}:build",
                        "model.options.width=wide")
    with pytest.raises(ConfigError, match="model.options.width"):
        prepare.build_model(cfg, plugins, data)


def test_a_module_spec_imports_from_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mynets_for_spec.py").write_text(MODELS.read_text())
    monkeypatch.chdir(tmp_path)
    cfg, plugins = load(tmp_path, "model: {name: 'mynets_for_spec:build_transformer'}\n"
                                  "data: {name: digits}\n")
    model = prepare.build_model(cfg, plugins, prepare.load_data(cfg, plugins))
    assert type(model).__name__ == "SmallTransformer"


def test_plugins_entries_resolve_against_the_config_folder_and_say_where(tmp_path,
                                                                         monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "beside_config_plugin.py").write_text(
        "import wfcore\nfrom wfcore.plugins.models import mlp\n\n\n@wfcore.hookimpl\n"
        "def wfcore_models():\n    return {'beside_mlp': mlp}\n")
    monkeypatch.chdir(tmp_path)
    cfg, plugins = load(tmp_path, "plugins: [beside_config_plugin]\n")
    assert "beside_mlp" in plugins.registry("models").names()
    cfg, plugins = load(tmp_path, "plugins: [beside_config_plugin.py]\n")
    assert "beside_mlp" in plugins.registry("models").names()
    with pytest.raises(PluginError) as err:
        load(tmp_path, "plugins: [no_such_plugin_module]\n")
    assert f"looked in {tmp_path / 'cfg'}, {tmp_path}, then the installed packages" \
        in str(err.value)


def test_a_whole_module_checkpoint_needs_the_explicit_opt_in(tmp_path):
    torch.manual_seed(1)
    saved = SmallCNN(1, 10, 8)
    torch.save(saved, tmp_path / "whole.pt")
    model = SmallCNN(1, 10, 8)
    with pytest.raises(WfcoreError) as err:
        specs.load_checkpoint(model, tmp_path / "whole.pt", trust=False)
    assert "model.trust_checkpoint=true" in str(err.value) and "\n" not in str(err.value)
    specs.load_checkpoint(model, tmp_path / "whole.pt", trust=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 saved.state_dict().values(), strict=True))
    torch.save(saved.state_dict(), tmp_path / "state.pt")  # a state_dict needs no opt-in
    specs.load_checkpoint(SmallCNN(1, 10, 8), tmp_path / "state.pt", trust=False)


def test_a_config_checkpoint_resolves_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    torch.save(SmallCNN(1, 10, 8).state_dict(), tmp_path / "cfg" / "dense.pt")
    monkeypatch.chdir(tmp_path)
    cfg, plugins = load(tmp_path, f"model: {{name: '{MODELS}:build', checkpoint: dense.pt}}\n"
                                  "data: {name: digits}\n")
    data = prepare.load_data(cfg, plugins)
    model = prepare.build_model(cfg, plugins, data)
    source = prepare.dense_model(cfg, model, data, torch.device("cpu"), torch.nn.CrossEntropyLoss())
    assert source == "dense.pt"


def test_imagefolder_reads_grayscale_with_channels_1(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / split / label / "0.png")
    cfg, plugins = load(tmp_path, f"data: {{name: imagefolder, root: '{tmp_path}', "
                                  "options: {channels: 1, image_size: 16}}\n")
    data = prepare.load_data(cfg, plugins)
    assert data.input_shape == (1, 16, 16) and data.train[0][0].shape == (1, 16, 16)
    cfg, plugins = load(tmp_path, "data: {name: imagefolder, options: {channels: 2}}\n")
    with pytest.raises(ConfigError, match="data.options: channels must be 1 or 3, got 2"):
        prepare.load_data(cfg, plugins)


def test_timm_models_by_name_and_pretrained_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once: no retries against the network
    pytest.importorskip("timm")
    import huggingface_hub.constants as hub  # read the variable when first imported

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    cfg, plugins = load(tmp_path, "model: {name: 'timm:test_resnet'}\ndata: {name: digits}\n")
    data = prepare.load_data(cfg, plugins)
    model = prepare.build_model(cfg, plugins, data)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    cfg, plugins = load(tmp_path, "model: {name: 'timm:test_resnet', options: {pretrained: "
                                  "true}}\ndata: {name: digits}\n")
    with pytest.raises(ConfigError) as err:
        prepare.build_model(cfg, plugins, data)
    assert str(err.value).startswith("model.options.pretrained: timm cannot load")
    assert "\n" not in str(err.value)


def test_a_mistyped_registered_name_is_still_an_unknown_name():
    registry = manager.build().registry("models")
    with pytest.raises(ConfigError, match=r"unknown model 'torchvison:resnet18' \(did you mean "
                                          r"'torchvision:'\?\), nor an importable"):
        registry.lookup("torchvison:resnet18", "model.name")
    with pytest.raises(ConfigError, match="file specs .* name models and data sets only"):
        manager.build().registry("estimators").lookup("x.py:make", "estimator.name")
