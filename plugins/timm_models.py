"""``timm:<name>``: any model of timm (PyTorch Image Models) when timm is installed
(``pip install 'wfcore[timm]'``), beside ``torchvision:<name>``.

timm builds the model for the data: ``num_classes`` and ``in_chans`` (the data's
channels) go to ``timm.create_model``, which adapts a pretrained first layer itself.
``pretrained: true`` loads timm's weights through the Hugging Face hub: from its cache
when offline, else a one-line error (wfcore downloads nothing itself). Pretrained weights
are then the starting point of dense training unless ``model.trained: true`` prunes them
as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wfcore import ConfigError, declare_options, first_line, hookimpl

log = logging.getLogger(__name__)


@dataclass
class TimmOptions:
    pretrained: bool = False  # timm's weights (Hugging Face cache when offline); false = random
    # more keyword arguments of timm.create_model, e.g. {img_size: 28} for a ViT on MNIST
    kwargs: dict[str, Any] = field(default_factory=dict)


def timm_model(options: TimmOptions, num_classes: int, input_shape: tuple[int, ...],
               target: str) -> nn.Module:
    """``timm.create_model(target)`` for the data's classes and channels, checked on one
    item of the data's shape."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.name=timm:{target}: timm is not installed; pip install "
                          "'wfcore[timm]' (or timm)") from None
    if not timm.is_model(target):
        close = timm.list_models(f"*{target.split('_')[0]}*")[:5]
        raise ConfigError(f"model.name: timm has no model '{target}'"
                          f"{'; similar: ' + ', '.join(close) if close else ''}")
    kwargs = dict(options.kwargs)
    if len(input_shape) == 3:
        kwargs.setdefault("in_chans", input_shape[0])
    try:
        model = timm.create_model(target, pretrained=options.pretrained,
                                  num_classes=num_classes, **kwargs)
    except Exception as exc:
        if options.pretrained:
            raise ConfigError(f"model.options.pretrained: timm cannot load the pretrained "
                              f"weights of '{target}' (offline, and not in the Hugging Face "
                              f"cache?): {type(exc).__name__}: {first_line(exc)}; set "
                              "pretrained=false, or give the weights as model.checkpoint "
                              "(HF_HUB_OFFLINE=1 fails at once instead of retrying)") \
                from None
        raise ConfigError(f"model.name=timm:{target}: timm.create_model failed: "
                          f"{type(exc).__name__}: {first_line(exc)}") from None
    try:  # one item through the model: an input it does not take fails here, in one line
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as exc:
        raise ConfigError(f"model.name=timm:{target} does not take the data's input shape "
                          f"{tuple(input_shape)}: {first_line(exc)} (model.options.kwargs "
                          "passes e.g. img_size to timm)") from None
    return model.train()


declare_options(timm_model, TimmOptions)


@hookimpl
def wfcore_models():
    return {"timm:": timm_model}
