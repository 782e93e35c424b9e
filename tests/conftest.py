import os
import sys
from pathlib import Path

import pytest

# Multi-rank workers are spawned processes: make `tests/` importable for them by name.
sys.path.insert(0, os.path.dirname(__file__))

ROOT = Path(__file__).resolve().parents[1]

# Optional datasets: a test that reads one is marked `@pytest.mark.dataset(name)` and takes its
# folder from the `dataset_dir` fixture. Without the data the test skips, and the reason says how
# to get it. TVLARS_TEST_DATA_ROOT=<folder> looks for every dataset under that folder instead of
# the defaults (an empty folder shows what a fresh machine skips).
#: name -> (default folder, subfolder under TVLARS_TEST_DATA_ROOT, a file it must hold, install)
OPTIONAL_DATASETS = {
    "fashion-mnist": (
        "/usr/share/datasets/fashion-mnist",
        "fashion-mnist",
        "train-images-idx3-ubyte.gz",
        "apt-get install dataset-fashion-mnist",
    ),
    "cifar10": (
        str(ROOT / "data"),
        "",
        "cifar-10-batches-py/data_batch_1",
        "python -c \"from torchvision.datasets import CIFAR10; CIFAR10('data', download=True)\" "
        "(once, with internet)",
    ),
    "tiny-imagenet": (
        str(ROOT / "data" / "tiny-imagenet-200"),
        "tiny-imagenet-200",
        "val/val_annotations.txt",
        "unzip http://cs231n.stanford.edu/tiny-imagenet-200.zip into data/",
    ),
}


def _dataset_name(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("dataset")
    if marker is None:
        return None
    (name,) = marker.args
    if name not in OPTIONAL_DATASETS:
        raise pytest.UsageError(f"{item.nodeid}: unknown dataset {name!r}")
    return name


def dataset_folder(name: str) -> Path:
    default, sub, _, _ = OPTIONAL_DATASETS[name]
    root = os.environ.get("TVLARS_TEST_DATA_ROOT")
    return Path(root, sub) if root else Path(default)


def pytest_runtest_setup(item: pytest.Item) -> None:
    name = _dataset_name(item)
    if name is None:
        return
    _, _, probe, install = OPTIONAL_DATASETS[name]
    folder = dataset_folder(name)
    if not (folder / probe).is_file():
        pytest.skip(f"dataset {name} not found in {folder}; to run this test: {install}")


@pytest.fixture
def dataset_dir(request: pytest.FixtureRequest) -> str:
    """The folder of the test's `@pytest.mark.dataset(name)` (present: the test would have been
    skipped otherwise); pass it as `--data-dir` / `data_dir`."""
    name = _dataset_name(request.node)
    if name is None:
        raise pytest.UsageError(f"{request.node.nodeid}: dataset_dir needs @pytest.mark.dataset")
    return str(dataset_folder(name))
