"""The classifier task's data sets (generated or loaded offline) and models."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class Data:
    """A classification data set as tensors; ``x`` is ``(N, L)`` signals or ``(N, H, W)`` images."""

    name: str
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def device(self) -> torch.device:
        return self.x.device


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays() -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds the global RNGs of numpy and random; leave the caller's untouched.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())  # generated locally (never get_dataset: it downloads)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


@functools.lru_cache(maxsize=4)
def _digits_arrays() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    mean, std = x_tr.mean(), x_tr.std()
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def load_data(name: str, train_size: int | None = None) -> Data:
    """MNIST-1D (4000 train / 1000 test signals of length 40, generated locally) or scikit-learn's
    digits (1347 / 450 images of 8x8, stratified split). ``train_size`` keeps the first samples."""
    arrays = _mnist1d_arrays() if name == "mnist1d" else _digits_arrays()
    x, y, x_test, y_test = (torch.as_tensor(a) for a in arrays)
    if train_size is not None:
        if not 1 <= train_size <= len(y):
            raise ValueError(f"--train-size must be in [1, {len(y)}] for {name}, got {train_size}")
        x, y = x[:train_size], y[:train_size]
    return Data(name, x.float(), y.long(), x_test.float(), y_test.long(), 10)


def add_label_noise(y: Tensor, fraction: float, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Give ``round(fraction * N)`` random samples a different, uniformly drawn wrong class.

    Returns the noisy labels and the bool mask of flipped samples.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    n_noisy = round(fraction * len(y))
    noisy = torch.zeros(len(y), dtype=torch.bool)
    noisy[torch.randperm(len(y), generator=g)[:n_noisy]] = True
    shift = torch.randint(1, num_classes, (len(y),), generator=g)
    return torch.where(noisy, (y + shift) % num_classes, y), noisy


class CNN1d(nn.Module):
    """The MNIST-1D paper's CNN: three strided convolutions (25 channels) and a linear head."""

    def __init__(self, length: int, num_classes: int, channels: int = 25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, 1, length)).shape[1]
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)))


class CNN2d(nn.Module):
    """A small CNN for 8x8 digits: two 3x3 convolutions (the second strided) and a linear head."""

    def __init__(self, shape: tuple[int, int], num_classes: int, channels: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, 1, *shape)).shape[1]
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)))


def build_model(name: str, data: Data) -> nn.Module:
    """``"cnn"``, ``"mlp"`` (two hidden layers of 100) or ``"linear"`` for ``data``'s input shape."""
    shape = tuple(data.x.shape[1:])
    if name == "cnn":
        return CNN1d(shape[0], data.num_classes) if len(shape) == 1 else CNN2d(shape, data.num_classes)
    features = math.prod(shape)
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, 100),
            nn.ReLU(),
            nn.Linear(100, 100),
            nn.ReLU(),
            nn.Linear(100, data.num_classes),
        )
    return nn.Sequential(nn.Flatten(), nn.Linear(features, data.num_classes))
