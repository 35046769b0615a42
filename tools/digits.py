"""Image data for the training examples, as numpy arrays (no deep-learning framework imported here).

Two sources:

* scikit-learn's ``digits`` (1797 grayscale 8x8 images of the digits 0-9, shipped inside the
  package: no download). The split is fixed (seed 0, 20% held out, stratified by class), so every
  run, whatever its ``--seed``, is measured on the same test images.
* a folder of images in the usual class-per-folder layout, loaded with PIL::

      DIR/<class name>/<image>.png|jpg|...            (20% of each class held out, fixed seed)
      DIR/train/<class name>/...  +  DIR/val/<class name>/...    (the ImageNet layout; ``test/`` too)

  Images are converted to grayscale (``channels=1``) or RGB (``channels=3``) and resized to
  ``size`` x ``size``; classes are the sorted folder names.

Pixels are scaled to [0, 1] and standardised with the training set's per-channel mean and std.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "ImageData", "DataError", "load_data", "load_digits", "load_image_folder"]

#: File suffixes read as images in a class-per-folder dataset.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")

#: Fraction of each class held out for testing when a dataset has no train/val split of its own.
TEST_FRACTION = 0.2

_SPLIT_SEED = 0


class DataError(ValueError):
    """A dataset that cannot be used: the message names the path or value and what would work."""


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A train/test split of images ``[N, C, H, W]`` (float32, standardised) and labels ``[N]`` (int64)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    source: str

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def size(self) -> int:
        return int(self.train_x.shape[2])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        return (f"{self.source}: {len(self.train_y)} training and {len(self.test_y)} test images, "
                f"{self.channels}x{self.size}x{self.size}, {self.num_classes} classes")


def _split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a fixed, stratified train/test split: ``TEST_FRACTION`` of each class (at least one) held out."""
    rng = np.random.default_rng(_SPLIT_SEED)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held = max(1, round(TEST_FRACTION * len(members))) if len(members) > 1 else 0
        test.append(members[:held])
        train.append(members[held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _standardise(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train_x.mean(axis=(0, 2, 3), keepdims=True)
    std = train_x.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return ((train_x - mean) / std).astype(np.float32), ((test_x - mean) / std).astype(np.float32)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``[N, C, H, W]`` images in [0, 1] to ``size`` x ``size`` (bilinear, with PIL)."""
    if images.shape[2] == size and images.shape[3] == size:
        return images
    from PIL import Image

    out = np.empty(images.shape[:2] + (size, size), dtype=np.float32)
    for n, image in enumerate(images):
        for c, plane in enumerate(image):
            plane_image = Image.fromarray(plane.astype(np.float32), mode="F")
            resized = plane_image.resize((size, size), Image.Resampling.BILINEAR)
            out[n, c] = np.asarray(resized, dtype=np.float32)
    return out


def _check_size(size: int | None) -> None:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 4):
        raise DataError(f"image size must be an int >= 4, got {size!r}")


def load_digits(size: int | None = None) -> ImageData:
    """scikit-learn's digits: 1437 training and 360 test images, 1x8x8 (or ``size`` x ``size``), 10 classes."""
    _check_size(size)
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise DataError("the digits images come with scikit-learn: pip install scikit-learn "
                        "(or give --data_path DIR with your own images)") from err
    bunch = sklearn_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    labels = np.asarray(bunch.target, dtype=np.int64)
    if size is not None:
        images = _resize(images, size)
    train, test = _split(labels)
    train_x, test_x = _standardise(images[train], images[test])
    return ImageData(train_x, labels[train], test_x, labels[test], tuple(str(d) for d in range(10)),
                     "sklearn digits")


def _class_folders(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))


def _read_folder(root: Path, classes: Sequence[str], channels: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES) \
            if folder.is_dir() else []
        if not files:
            raise DataError(f"class folder {str(folder)!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                with Image.open(path) as image:
                    pixels = image.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                    array = np.asarray(pixels, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as err:
                raise DataError(f"cannot read image {str(path)!r}: {err}") from err
            images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_image_folder(path: str | Path, size: int = 32, channels: int = 1) -> ImageData:
    """Images in class-per-folder layout (see the module docstring), ``channels`` x ``size`` x ``size``."""
    _check_size(size)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"--data_path {str(root)!r} is not a folder")
    test_name = next((name for name in ("val", "test") if (root / name).is_dir()), None)
    if (root / "train").is_dir() and test_name is not None:
        classes = [folder.name for folder in _class_folders(root / "train")]
        if len(classes) < 2:
            raise DataError(f"{str(root / 'train')!r} must hold one folder per class (at least 2), "
                            f"found {classes!r}")
        test_classes = [folder.name for folder in _class_folders(root / test_name)]
        if test_classes != classes:
            raise DataError(f"{str(root / test_name)!r} has classes {test_classes!r}, {str(root / 'train')!r} "
                            f"has {classes!r}: they must match")
        train_x, train_y = _read_folder(root / "train", classes, channels, size)
        test_x, test_y = _read_folder(root / test_name, classes, channels, size)
    else:
        classes = [folder.name for folder in _class_folders(root)]
        if len(classes) < 2:
            raise DataError(f"--data_path {str(root)!r} must hold one folder of images per class (at least 2), "
                            f"or train/ and val/ folders of them; found {classes!r}")
        images, labels = _read_folder(root, classes, channels, size)
        train, test = _split(labels)
        if len(test) == 0:
            raise DataError(f"--data_path {str(root)!r} has too few images to hold any out for testing "
                            f"(each class needs at least 2)")
        train_x, train_y, test_x, test_y = images[train], labels[train], images[test], labels[test]
    train_x, test_x = _standardise(train_x, test_x)
    return ImageData(train_x, train_y, test_x, test_y, tuple(classes), f"images in {str(root)!r}")


def load_data(data_path: str | Path | None = None, size: int | None = None, channels: int = 1) -> ImageData:
    """The digits (``data_path=None``, 8x8 unless ``size`` is given) or a class-per-folder dataset (32x32 default)."""
    if data_path is None:
        if channels != 1:
            raise DataError(f"the digits images are grayscale: channels must be 1, got {channels!r}")
        return load_digits(size)
    return load_image_folder(data_path, size if size is not None else 32, channels)
