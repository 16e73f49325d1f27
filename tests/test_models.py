"""Built-in models: a torchvision classifier fitted to the data's number of channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from wfcore.plugins.models import adapt_first_conv, first_layer, fit_input_channels

from wfcore import cli, manager
from wfcore.errors import ConfigError

PLUGINS = manager.build()


def torchvision(name: str, input_shape: tuple[int, ...], **options) -> nn.Module:
    entry, extra = PLUGINS.registry("models").lookup(f"torchvision:{name}", "model.name")
    return entry.factory(entry.options_class(**options), num_classes=10,
                         input_shape=input_shape, **extra)


@pytest.mark.parametrize("name, first", [("resnet18", "conv1"),
                                         ("mobilenet_v3_small", "features.0.0")])
def test_a_torchvision_model_takes_one_channel_data(name, first, caplog):
    with caplog.at_level("INFO", logger="wfcore.plugins.models"):
        model = torchvision(name, (1, 28, 28))
    conv = model.get_submodule(first)
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 1
    assert f"first conv '{first}' takes 1 input channels instead of 3" in caplog.text
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_data_with_the_model_s_channels_leaves_its_first_conv_alone(caplog):
    with caplog.at_level("INFO", logger="wfcore.plugins.models"):
        model = torchvision("resnet18", (3, 32, 32))
    assert model.conv1.in_channels == 3 and "first conv" not in caplog.text


def test_without_adapt_channels_other_channels_are_a_one_line_error():
    with pytest.raises(ConfigError) as info:
        torchvision("resnet18", (1, 28, 28), adapt_channels=False)
    message = str(info.value)
    assert "\n" not in message
    for part in ("model.name=torchvision:resnet18", "takes 3 input channels",
                 "the data has 1", "model.options.adapt_channels"):
        assert part in message


def test_the_first_layer_is_found_by_the_forward_not_by_its_name():
    class Late(nn.Module):  # declares its head first, runs its stem first
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.stem = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.head(self.stem(x).mean((2, 3)))

    model = Late()
    name, module = first_layer(model, torch.zeros(1, 1, 8, 8))
    assert name == "stem" and module is model.stem
    fit_input_channels(model, (1, 8, 8), "late", adapt=True)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 2)


def test_a_model_without_a_first_conv_is_a_one_line_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with pytest.raises(ConfigError, match=r"model.name=flat: no first Conv2d .* 1 input "
                                          r"channels \(the first layer: '0' is a Flatten\)"):
        fit_input_channels(model, (1, 4, 4), "flat", adapt=True)


def test_pretrained_weights_are_averaged_over_the_input_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    old = model[0].weight.detach().clone()  # (4, 3, 3, 3)
    new = adapt_first_conv(model, "0", 2, pretrained=True)
    assert model[0] is new and new.weight.shape == (4, 2, 3, 3)
    torch.testing.assert_close(new.weight.detach(),
                               old.mean(dim=1, keepdim=True).expand(4, 2, 3, 3))


def test_wfcore_options_shows_adapt_channels(capsys):
    assert cli.main(["options", "model", "torchvision:"]) == 0
    assert "adapt_channels: bool = True" in capsys.readouterr().out


def test_an_input_too_small_for_the_model_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"model.name=torchvision:vgg11 does not take the "
                                          r"data's input shape \(1, 28, 28\): "):
        torchvision("vgg11", (1, 28, 28))
