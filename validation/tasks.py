"""Fine-tuning tasks that need no download: real handwritten digits, clean, corrupted or unseen.

``costmodel finetune`` runs real fine-tuning loops the way the seed paper's study does: a model
pretrained on a source task is fine-tuned under a distribution shift (CIFAR-10-C style) or on
classes it never saw. Downloading CIFAR-10-C is not an option here, so the tasks are built from
``sklearn.datasets.load_digits()`` (1,797 real 8x8 grey digits, values 0..16, shipped inside the
scikit-learn wheel) and corrupted with the published CIFAR-10-C definitions.

Task names (``task_names()`` lists every one):

- ``digits``: clean, all 10 classes.
- ``digits-<corruption>-<severity>``: a distribution shift of ``digits``, severity 1..5; the source
  (pretraining) task is ``digits``.
- ``digits-0to4``: clean digits of classes 0-4 (5 classes), the source task of the unseen-classes
  study.
- ``digits-unseen``: the digits 5-9 relabelled 0-4 (5 classes), clean; source ``digits-0to4``.
- ``digits-unseen-<corruption>-<severity>``: the same, corrupted; source ``digits-0to4``.

How one image is made (``__getitem__``, so no more than one image at the resolution exists at a
time: all 1,797 at 224x224x3 would be 1 GB):

1. the 8x8 digit is scaled to [0, 1] (divided by 16);
2. it is upsampled to ``resolution`` x ``resolution`` with
   ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``; ``resolution`` must
   be at least 8 (8 leaves the digit as it is: downsampling would throw the data away); the map's
   separable weights are taken from ``interpolate`` once per resolution and applied in numpy;
3. it is replicated to ``channels`` channels;
4. the corruption is applied AT THE RESOLUTION, per element of the (channels, R, R) image, as
   CIFAR-10-C applies it per element of its 32x32x3 images, and the result is clipped to [0, 1];
5. it is normalised with the fixed affine map ``(x - NORMALISE_MEAN) / NORMALISE_STD``, i.e.
   ``(x - 0.5) / 0.5``, onto [-1, 1], and returned as float32.

The corruptions follow Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations" (ICLR), whose CIFAR-10-C generator is
``ImageNet-C/create_c/make_cifar_c.py`` in the GitHub repository ``hendrycks/robustness``; the
severity constants below are that file's CIFAR ones, and the formulas (for x in [0, 1]) are its:

- ``gaussian_noise``: ``clip(x + N(0, c))``, c = 0.04, 0.06, 0.08, 0.09, 0.10 (c is the std);
- ``shot_noise``: ``clip(Poisson(x * c) / c)``, c = 500, 250, 100, 75, 50;
- ``impulse_noise``: scikit-image's ``random_noise(x, mode="s&p", amount=c)`` with its default
  ``salt_vs_pepper=0.5``, c = 0.01, 0.02, 0.03, 0.05, 0.07: each element independently is replaced
  with probability ``c``, and a replaced element becomes 1 or 0 with probability 1/2 each (the
  definition of ``skimage/util/noise.py`` in ``scikit-image/scikit-image``, written here in numpy
  so that scikit-image is no dependency);
- ``brightness``: to HSV, ``V = clip(V + c)``, back to RGB, c = 0.05, 0.1, 0.15, 0.2, 0.3. With
  hue and saturation fixed every RGB component is proportional to V (= the channel maximum), so
  the round trip is exactly ``x * V' / V`` (and ``V'`` in every channel where V = 0, as
  ``rgb2hsv`` gives S = 0 there). That form is used for every channel count: for 3 channels it is
  the HSV map; for any other count it is the same map on the grey value, and since the channels are
  replicated grey when the corruption is applied (S = 0) it is ``clip(x + c)`` in every case here;
- ``contrast``: ``clip((x - m) * c + m)`` with ``m`` the mean of each channel over the image
  (``np.mean(x, axis=(0, 1))`` of an HxWx3 image in the original), c = 0.75, 0.5, 0.4, 0.3, 0.15.

Determinism: every value is a pure function of (name, resolution, channels, seed, eval_fraction,
train_size). The noise of an image comes from its own numpy Generator seeded by (seed, index of
the image among the 1,797), so an item is the same whether or not other items are computed, in
train or in eval, with any ``train_size`` and in every task that contains it. The train/eval split
is stratified: a permutation seeded by (seed, digit) sends ``eval_fraction`` of each digit's
images (rounded half up, at least 1) to eval, so a digit's split is the same in every task.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from costmodel.errors import CostModelError

DIGIT_SIDE = 8  # load_digits() images are 8x8
DIGIT_MAX = 16.0  # and their values are 0..16
NORMALISE_MEAN = 0.5
NORMALISE_STD = 0.5
SEVERITIES = (1, 2, 3, 4, 5)

# CIFAR-10-C severity constants, severity 1..5 (make_cifar_c.py, hendrycks/robustness).
SEVERITY_CONSTANTS: dict[str, tuple[float, ...]] = {
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to V of HSV
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the deviation from the channel mean
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of the additive normal noise
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of elements replaced by 0 or 1
    "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),  # photons per unit intensity
}
SALT_VS_PEPPER = 0.5  # scikit-image's default, which make_cifar_c.py keeps

CLEAN_TASKS = ("digits", "digits-0to4", "digits-unseen")
# Each base task: (source task, the original digits it keeps, in label order, words for humans).
_BASES: dict[str, tuple[str, tuple[int, ...], str]] = {
    "digits": ("digits", tuple(range(10)), "all 10 digits"),
    "digits-0to4": ("digits-0to4", (0, 1, 2, 3, 4), "digits 0-4 only"),
    "digits-unseen": ("digits-0to4", (5, 6, 7, 8, 9), "digits 5-9 relabelled 0-4, unseen by digits-0to4"),
}
_CORRUPTIBLE_BASES = ("digits", "digits-unseen")

# Independent random streams under one seed: SeedSequence spawn keys.
_NOISE_STREAM = 0
_SPLIT_STREAM = 1
_ORDER_STREAM = 2


@dataclass(frozen=True)
class Task:
    """One fine-tuning task: its data and what it was pretrained on, for the finetune loop."""

    name: str  # as given, e.g. "digits-impulse_noise-3"
    source: str  # the pretraining task: "digits", or "digits-0to4" for the unseen classes
    classes: int  # outputs of the fine-tuned head
    train: Dataset  # items (float32 [channels, R, R] image, int64 0-d label)
    eval: Dataset
    description: str  # one line for humans: the data and the shift


def corruption_names() -> list[str]:
    """Every corruption a task name may carry, sorted."""
    return sorted(SEVERITY_CONSTANTS)


def task_names() -> list[str]:
    """Every valid task name, for messages and --help."""
    names = list(CLEAN_TASKS)
    for base in _CORRUPTIBLE_BASES:
        names += [f"{base}-{corruption}-{severity}" for corruption in corruption_names() for severity in SEVERITIES]
    return names


def corrupt(image: np.ndarray, corruption: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply one CIFAR-10-C corruption to a (channels, H, W) image in [0, 1]; the result is clipped
    to [0, 1]. Public so that each formula can be checked on crafted input."""
    if corruption not in SEVERITY_CONSTANTS:
        raise CostModelError(f"unknown corruption {corruption!r}; corruptions: {', '.join(corruption_names())}")
    _check_severity(severity, f"corruption {corruption!r}")
    constant = SEVERITY_CONSTANTS[corruption][severity - 1]
    x = np.asarray(image, dtype=np.float64)
    if x.ndim != 3:
        raise CostModelError(f"corrupt() takes a (channels, H, W) image, not one of shape {x.shape}")
    return np.clip(_CORRUPTIONS[corruption](x, constant, rng), 0.0, 1.0)


def _gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, std, size=x.shape)


def _shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    # Clipped before sampling only so that a stray value below 0 cannot make Poisson raise.
    return rng.poisson(np.clip(x, 0.0, None) * photons) / photons


def _impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    replaced = rng.random(x.shape) <= amount
    salted = rng.random(x.shape) <= SALT_VS_PEPPER
    out = x.copy()
    out[replaced & salted] = 1.0
    out[replaced & ~salted] = 0.0
    return out


def _brightness(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    # HSV's V is the channel maximum, and with H and S fixed every component is proportional to V.
    # The maximal channel becomes V' itself (exactly clip(x + c) for a grey image), the others
    # scale with it; where V = 0 every channel is maximal, as rgb2hsv's S = 0 there.
    value = x.max(axis=0, keepdims=True)
    brighter = np.clip(value + shift, 0.0, 1.0)
    scale = np.divide(brighter, value, out=np.zeros_like(value), where=value > 0)
    return np.where(x == value, brighter, x * scale)


def _contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(1, 2), keepdims=True)  # per channel, over the image
    return (x - means) * factor + means


_CORRUPTIONS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "brightness": _brightness,
    "contrast": _contrast,
    "gaussian_noise": _gaussian_noise,
    "impulse_noise": _impulse_noise,
    "shot_noise": _shot_noise,
}


def noise_generator(seed: int, digit_index: int) -> np.random.Generator:
    """The Generator that corrupts image ``digit_index`` (of the 1,797) under ``seed``: its own
    stream, so an image's noise depends on nothing else."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_NOISE_STREAM, digit_index)))


@functools.lru_cache(maxsize=8)
def bilinear_weights(resolution: int) -> np.ndarray:
    """The (resolution, 8) matrix W with ``interpolate(x) == W @ x @ W.T`` for an 8x8 ``x``.

    Bilinear interpolation with align_corners=False is separable and its weights along each axis
    sum to 1, so interpolating the 8 images that are 1 on one row and 0 elsewhere gives W's columns.
    Applying W in numpy is the same map as ``F.interpolate`` (to float32 rounding) but costs no
    torch call per image, whose intra-op threads make a tiny interpolation slow on a busy machine.
    """
    rows = torch.zeros(DIGIT_SIDE, 1, DIGIT_SIDE, DIGIT_SIDE, dtype=torch.float64)
    for row in range(DIGIT_SIDE):
        rows[row, 0, row, :] = 1.0
    spread = F.interpolate(rows, size=(resolution, resolution), mode="bilinear", align_corners=False)
    weights = spread[:, 0, :, 0].T.numpy().copy()
    weights.flags.writeable = False
    return weights


def upsample(digit: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """An 8x8 digit (values 0..16) as a (channels, resolution, resolution) float64 image in [0, 1]:
    ``F.interpolate(mode="bilinear", align_corners=False)`` of the digit, replicated."""
    weights = bilinear_weights(resolution)
    grey = weights @ (np.asarray(digit, dtype=np.float64) / DIGIT_MAX) @ weights.T
    return np.broadcast_to(grey, (channels, resolution, resolution)).copy()


class DigitImages(Dataset):
    """A subset of the 1,797 digits, made into images one at a time (see the module docstring)."""

    def __init__(self, digits: np.ndarray, digit_indices: np.ndarray, labels: np.ndarray, resolution: int,
                 channels: int, corruption: str | None, severity: int | None, seed: int) -> None:
        self.digit_indices = np.array(digit_indices, dtype=np.int64)  # indices into load_digits()
        self.labels = np.array(labels, dtype=np.int64)  # task labels, 0..classes-1
        self.digits = np.array(digits[self.digit_indices], dtype=np.float32)  # (n, 8, 8), 0..16
        self.resolution = resolution
        self.channels = channels
        self.corruption = corruption
        self.severity = severity
        self.seed = seed
        for array in (self.digit_indices, self.labels, self.digits):
            array.flags.writeable = False

    def __len__(self) -> int:
        return len(self.digit_indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = upsample(self.digits[item], self.resolution, self.channels)
        if self.corruption is not None:
            rng = noise_generator(self.seed, int(self.digit_indices[item]))
            image = corrupt(image, self.corruption, self.severity, rng)
        image = (np.clip(image, 0.0, 1.0) - NORMALISE_MEAN) / NORMALISE_STD
        return torch.from_numpy(image.astype(np.float32)), torch.tensor(self.labels[item], dtype=torch.int64)


@functools.lru_cache(maxsize=1)
def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as (images (1797, 8, 8) float64 0..16, targets (1797,) int64), read-only.

    scikit-learn is imported here, not at module import, so that the rest of costmodel never needs it.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CostModelError("the digit tasks need scikit-learn (not installed): pip install scikit-learn") from None
    bunch = load_digits()
    images = np.array(bunch.images, dtype=np.float64)
    targets = np.array(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    targets.flags.writeable = False
    return images, targets


def load_task(name: str, resolution: int, *, channels: int = 3, seed: int = 0,
              eval_fraction: float = 0.2, train_size: int | None = None) -> Task:
    """Build the task ``name`` at ``resolution`` x ``resolution`` with ``channels`` channels.

    ``eval_fraction`` of each class goes to eval; ``train_size`` keeps only the first
    ``train_size`` training items of a seeded class-balanced order (round robin over the classes),
    for tests and small studies; eval is unaffected. Bad input raises CostModelError.
    """
    base, corruption, severity = _parse_name(name)
    resolution = _check_integer(resolution, "resolution", DIGIT_SIDE, "an integer >= 8 (the digits are 8x8)")
    channels = _check_integer(channels, "channels", 1, "an integer >= 1")
    seed = _check_integer(seed, "seed", 0, "an integer >= 0")
    eval_fraction = _check_fraction(eval_fraction)
    source, kept_digits, words = _BASES[base]

    images, targets = load_digit_arrays()
    train_parts: list[np.ndarray] = []
    eval_parts: list[np.ndarray] = []
    for digit in kept_digits:
        members = np.flatnonzero(targets == digit)
        split_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_STREAM, digit)))
        members = split_rng.permutation(members)
        n_eval = max(1, math.floor(eval_fraction * len(members) + 0.5))
        if n_eval >= len(members):
            raise CostModelError(f"eval_fraction {eval_fraction} leaves digit {digit} with no training image "
                                 f"({len(members)} images, {n_eval} to eval); use a smaller eval_fraction")
        eval_parts.append(members[:n_eval])
        train_parts.append(members[n_eval:])

    train_order = _class_balanced_order(train_parts, seed)
    if train_size is not None:
        train_size = _check_integer(train_size, "train_size", 1, f"an integer 1..{len(train_order)}")
        if train_size > len(train_order):
            raise CostModelError(f"train_size {train_size} exceeds the {len(train_order)} training images of "
                                 f"task {name!r}; use 1..{len(train_order)}")
        train_order = train_order[:train_size]
    eval_order = np.sort(np.concatenate(eval_parts))

    label_of_digit = np.full(10, -1, dtype=np.int64)
    label_of_digit[list(kept_digits)] = np.arange(len(kept_digits))

    def dataset(indices: np.ndarray) -> DigitImages:
        return DigitImages(images, indices, label_of_digit[targets[indices]], resolution, channels,
                           corruption, severity, seed)

    shift = "clean" if corruption is None else (
        f"{corruption} severity {severity} (CIFAR-10-C constant {SEVERITY_CONSTANTS[corruption][severity - 1]:g})")
    description = (f"sklearn digits ({words}; 8x8 grey, bilinear to {resolution}x{resolution}, {channels} channel"
                   f"{'' if channels == 1 else 's'}), {shift}; pretrained on {source!r}")
    return Task(name=name, source=source, classes=len(kept_digits), train=dataset(train_order),
                eval=dataset(eval_order), description=description)


def _class_balanced_order(per_class: list[np.ndarray], seed: int) -> np.ndarray:
    """Round robin over the classes, each class in a seeded order, so every prefix is balanced."""
    order_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_ORDER_STREAM,)))
    shuffled = [order_rng.permutation(members) for members in per_class]
    longest = max(len(members) for members in shuffled)
    return np.array([members[rank] for rank in range(longest) for members in shuffled if rank < len(members)],
                    dtype=np.int64)


def _parse_name(name: object) -> tuple[str, str | None, int | None]:
    """(base task, corruption or None, severity or None) of a task name."""
    if not isinstance(name, str):
        raise CostModelError(f"a task name is a string, not {name!r}; {_task_list()}")
    if name in CLEAN_TASKS:
        return name, None, None
    base = next((b for b in ("digits-unseen", "digits") if name.startswith(b + "-")), None)
    if base is None or name.startswith("digits-0to4-"):  # digits-0to4 is only a clean source task
        raise CostModelError(f"unknown task {name!r}; {_task_list()}")
    corruption, dash, severity_text = name[len(base) + 1:].rpartition("-")
    if not dash:
        if severity_text in SEVERITY_CONSTANTS:
            raise CostModelError(f"task {name!r} needs a severity: {name}-<1..5>")
        raise CostModelError(f"unknown task {name!r}; {_task_list()}")
    if corruption not in SEVERITY_CONSTANTS:
        raise CostModelError(f"unknown corruption {corruption!r} in task {name!r}; "
                             f"corruptions: {', '.join(corruption_names())}")
    if not (severity_text.isascii() and severity_text.isdigit()) or int(severity_text) not in SEVERITIES:
        raise CostModelError(f"severity {severity_text!r} in task {name!r} is not an integer 1..5")
    return base, corruption, int(severity_text)


def _task_list() -> str:
    return (f"tasks: {', '.join(CLEAN_TASKS)}, digits-<corruption>-<severity>, "
            f"digits-unseen-<corruption>-<severity> (corruptions: {', '.join(corruption_names())}; severity 1..5)")


def _check_severity(severity: object, what: str) -> None:
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or int(severity) not in SEVERITIES:
        raise CostModelError(f"severity {severity!r} of {what} is not an integer 1..5")


def _check_integer(value: object, what: str, minimum: int, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise CostModelError(f"{what} {value!r} is not valid: expected {expected}")
    return int(value)


def _check_fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise CostModelError(f"eval_fraction {value!r} is not in (0, 1)")
    return float(value)
