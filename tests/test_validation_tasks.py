"""The digit fine-tuning tasks: shapes, splits, determinism, and each CIFAR-10-C corruption against
its closed form (validation/tasks.py)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from costmodel.errors import CostModelError
from costmodel.validation.tasks import (
    NORMALISE_MEAN,
    NORMALISE_STD,
    SEVERITY_CONSTANTS,
    Task,
    corrupt,
    corruption_names,
    load_digit_arrays,
    load_task,
    noise_generator,
    task_names,
    upsample,
)

DIGITS, TARGETS = load_digit_arrays()


def reference_upsample(digit_index: int, resolution: int, channels: int) -> np.ndarray:
    """The documented pipeline's first steps, straight from torch: /16, bilinear, replicate."""
    grey = torch.tensor(DIGITS[digit_index] / 16.0).reshape(1, 1, 8, 8)
    grey = F.interpolate(grey, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return grey[0].repeat(channels, 1, 1).numpy()


def normalised(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) - 0.5) / 0.5


def mid_grey(channels: int = 3, side: int = 200) -> np.ndarray:
    return np.full((channels, side, side), 0.5)


# --- names, shapes, splits -------------------------------------------------------------------

def test_names_and_published_constants() -> None:
    assert corruption_names() == ["brightness", "contrast", "gaussian_noise", "impulse_noise", "shot_noise"]
    # Hendrycks & Dietterich 2019, CIFAR-10-C severities 1..5 (make_cifar_c.py).
    assert SEVERITY_CONSTANTS == {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    }
    names = task_names()
    expected = {"digits", "digits-0to4", "digits-unseen", "digits-impulse_noise-3", "digits-unseen-contrast-5"}
    assert expected <= set(names)
    assert len(names) == len(set(names)) == 3 + 2 * 5 * 5
    assert NORMALISE_MEAN == 0.5 and NORMALISE_STD == 0.5


@pytest.mark.parametrize("name, source, classes, digits", [
    ("digits", "digits", 10, range(10)),
    ("digits-brightness-2", "digits", 10, range(10)),
    ("digits-0to4", "digits-0to4", 5, range(5)),
    ("digits-unseen", "digits-0to4", 5, range(5, 10)),
    ("digits-unseen-impulse_noise-5", "digits-0to4", 5, range(5, 10)),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_dtypes_and_split(name: str, source: str, classes: int, digits: range, channels: int) -> None:
    task = load_task(name, 12, channels=channels)
    assert isinstance(task, Task)
    assert (task.name, task.source, task.classes) == (name, source, classes)
    assert "\n" not in task.description and task.description
    image, label = task.train[0]
    assert image.shape == (channels, 12, 12) and image.dtype == torch.float32
    assert label.shape == () and label.dtype == torch.int64
    assert -1.0 <= image.min() and image.max() <= 1.0

    train_idx, eval_idx = task.train.digit_indices, task.eval.digit_indices
    assert len(task.train) == len(train_idx) and len(task.eval) == len(eval_idx)
    assert not set(train_idx) & set(eval_idx)
    assert sorted(np.concatenate([train_idx, eval_idx])) == sorted(np.flatnonzero(np.isin(TARGETS, list(digits))))
    for split in (task.train, task.eval):
        # labels are the original digits shifted down to 0..classes-1
        assert np.array_equal(TARGETS[split.digit_indices] - digits.start, split.labels)
    for digit in digits:
        n = int((TARGETS == digit).sum())
        n_eval = int((TARGETS[eval_idx] == digit).sum())
        assert n_eval == max(1, math.floor(0.2 * n + 0.5))
    if name == "digits":
        assert len(task.train) + len(task.eval) == 1797


def test_dataloader_collates_float32_images_and_int64_labels() -> None:
    task = load_task("digits-gaussian_noise-1", 16)
    images, labels = next(iter(DataLoader(task.train, batch_size=5)))
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (5,) and labels.dtype == torch.int64
    assert labels.tolist() == [0, 1, 2, 3, 4]  # the training order is class-balanced round robin


def test_unseen_images_are_the_original_five_to_nine() -> None:
    unseen = load_task("digits-unseen", 8, channels=1)
    for item in (0, 7, len(unseen.eval) - 1):
        index = int(unseen.eval.digit_indices[item])
        image, label = unseen.eval[item]
        assert TARGETS[index] == int(label) + 5
        assert np.allclose(image.numpy(), normalised(DIGITS[index][None] / 16.0), atol=1e-6)


def test_train_size_keeps_a_balanced_prefix_and_leaves_eval_alone() -> None:
    full = load_task("digits-shot_noise-2", 8)
    small = load_task("digits-shot_noise-2", 8, train_size=23)
    assert len(small.train) == 23
    assert np.array_equal(small.train.digit_indices, full.train.digit_indices[:23])
    per_class = np.bincount(small.train.labels, minlength=10)
    assert per_class.max() - per_class.min() <= 1
    assert np.array_equal(small.eval.digit_indices, full.eval.digit_indices)
    for item in (0, 22):
        assert torch.equal(small.train[item][0], full.train[item][0])


# --- the pipeline against its documented closed form ------------------------------------------

def test_upsample_is_torch_bilinear() -> None:
    for resolution in (8, 11, 32):
        assert np.allclose(upsample(DIGITS[5], resolution, 2), reference_upsample(5, resolution, 2), atol=1e-12)


def test_clean_and_brightness_items_follow_the_pipeline() -> None:
    clean = load_task("digits", 20)
    bright = load_task("digits-brightness-4", 20)
    assert np.array_equal(clean.eval.digit_indices, bright.eval.digit_indices)
    for item in (0, 100):
        index = int(clean.eval.digit_indices[item])
        up = reference_upsample(index, 20, 3)
        assert np.allclose(clean.eval[item][0].numpy(), normalised(up), atol=1e-6)
        assert np.allclose(bright.eval[item][0].numpy(), normalised(up + 0.2), atol=1e-6)


def test_gaussian_item_uses_the_image_s_own_noise_stream() -> None:
    task = load_task("digits-gaussian_noise-3", 10, seed=7)
    item = 3
    index = int(task.train.digit_indices[item])
    noise = noise_generator(7, index).normal(0.0, 0.08, size=(3, 10, 10))
    expected = normalised(reference_upsample(index, 10, 3) + noise)
    assert np.allclose(task.train[item][0].numpy(), expected, atol=1e-6)


# --- determinism -----------------------------------------------------------------------------

def test_same_arguments_give_identical_tensors() -> None:
    first = load_task("digits-impulse_noise-4", 16, seed=3)
    second = load_task("digits-impulse_noise-4", 16, seed=3)
    assert np.array_equal(first.train.digit_indices, second.train.digit_indices)
    for item in (0, 50, 400):
        assert torch.equal(first.train[item][0], second.train[item][0])
        assert torch.equal(first.train[item][1], second.train[item][1])
    assert torch.equal(first.eval[9][0], first.eval[9][0])  # recomputing an item changes nothing


def test_different_seed_gives_different_noise() -> None:
    seed0 = load_task("digits-gaussian_noise-2", 16, seed=0)
    seed1 = load_task("digits-gaussian_noise-2", 16, seed=1)
    index = int(seed0.train.digit_indices[0])
    where = {int(i): n for n, i in enumerate(seed1.train.digit_indices)}
    item1 = where.get(index)
    split1 = seed1.train
    if item1 is None:
        split1 = seed1.eval
        item1 = int(np.flatnonzero(seed1.eval.digit_indices == index)[0])
    assert not torch.equal(seed0.train[0][0], split1[item1][0])


def test_noise_does_not_depend_on_split_membership() -> None:
    """An image moved from train to eval by a larger eval_fraction keeps its noise."""
    a = load_task("digits-shot_noise-5", 8, eval_fraction=0.2)
    b = load_task("digits-shot_noise-5", 8, eval_fraction=0.5)
    assert set(a.eval.digit_indices) <= set(b.eval.digit_indices)  # one permutation per digit: nested
    b_eval = {int(i): n for n, i in enumerate(b.eval.digit_indices)}
    moved = [(n, b_eval[int(i)]) for n, i in enumerate(a.train.digit_indices) if int(i) in b_eval]
    assert len(moved) > 300
    for item_a, item_b in moved[:5]:
        assert torch.equal(a.train[item_a][0], b.eval[item_b][0])


# --- each corruption against its closed form on crafted input --------------------------------

@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_brightness_on_grey_is_clip_x_plus_c(severity: int, channels: int) -> None:
    grey = np.random.default_rng(0).uniform(0.0, 1.0, size=(1, 9, 9))
    grey[0, 0, :3] = (0.0, 1.0, 0.98)
    image = np.repeat(grey, channels, axis=0)
    c = SEVERITY_CONSTANTS["brightness"][severity - 1]
    assert np.array_equal(corrupt(image, "brightness", severity, np.random.default_rng(0)), np.clip(image + c, 0, 1))


def test_brightness_on_colour_is_the_hsv_value_shift() -> None:
    rgb = np.random.default_rng(1).uniform(0.0, 1.0, size=(3, 6, 6))
    rgb[:, 0, 0] = 0.0  # black: V = 0
    out = corrupt(rgb, "brightness", 5, np.random.default_rng(0))
    for row in range(6):
        for col in range(6):
            h, s, v = colorsys.rgb_to_hsv(*rgb[:, row, col])
            assert np.allclose(out[:, row, col], colorsys.hsv_to_rgb(h, s, min(1.0, v + 0.3)), atol=1e-12)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_std_is_c(severity: int) -> None:
    c = SEVERITY_CONSTANTS["gaussian_noise"][severity - 1]
    out = corrupt(mid_grey(), "gaussian_noise", severity, np.random.default_rng(severity))
    deviation = out - 0.5
    assert abs(deviation.std() / c - 1) < 0.02  # 120,000 samples: relative std error about 0.2%
    assert abs(deviation.mean()) < 5 * c / math.sqrt(deviation.size)


def test_impulse_noise_replaces_amount_with_zero_or_one() -> None:
    image = np.random.default_rng(2).uniform(0.1, 0.9, size=(3, 200, 200))
    fractions = []
    for severity in (1, 2, 3, 4, 5):
        amount = SEVERITY_CONSTANTS["impulse_noise"][severity - 1]
        out = corrupt(image, "impulse_noise", severity, np.random.default_rng(42))
        changed = out != image
        assert np.isin(out[changed], (0.0, 1.0)).all()
        fraction = changed.mean()
        assert abs(fraction - amount) < 5 * math.sqrt(amount * (1 - amount) / image.size)
        salt = (out[changed] == 1.0).mean()
        assert abs(salt - 0.5) < 5 * math.sqrt(0.25 / changed.sum())
        fractions.append(fraction)
    assert fractions == sorted(fractions) and len(set(fractions)) == 5


@pytest.mark.parametrize("severity", [1, 5])
def test_shot_noise_preserves_the_mean(severity: int) -> None:
    c = SEVERITY_CONSTANTS["shot_noise"][severity - 1]
    out = corrupt(mid_grey(), "shot_noise", severity, np.random.default_rng(severity))
    assert np.allclose(out * c, np.round(out * c))  # counts of photons over c
    assert abs(out.mean() - 0.5) < 5 * math.sqrt(0.5 / c / out.size)
    assert abs(out.std() / math.sqrt(0.5 / c) - 1) < 0.02  # Poisson: variance = mean


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_contrast_scales_the_deviation_from_each_channel_mean(severity: int) -> None:
    rng = np.random.default_rng(3)
    image = np.stack([rng.uniform(0.0, 0.4, (7, 7)), rng.uniform(0.3, 1.0, (7, 7)), rng.uniform(0, 1, (7, 7))])
    c = SEVERITY_CONSTANTS["contrast"][severity - 1]
    out = corrupt(image, "contrast", severity, np.random.default_rng(0))
    means = image.mean(axis=(1, 2), keepdims=True)
    assert np.allclose(out.mean(axis=(1, 2), keepdims=True), means, atol=1e-12)
    assert np.allclose(out - means, (image - means) * c, atol=1e-12)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, words", [
    ("cifar10", {}, "unknown task 'cifar10'"),
    ("digits-", {}, "unknown task"),
    ("digits-foo-3", {}, "unknown corruption 'foo' in task 'digits-foo-3'; corruptions: brightness, contrast"),
    ("digits-brightness", {}, "needs a severity"),
    ("digits-brightness-0", {}, "severity '0'"),
    ("digits-brightness-6", {}, "severity '6'"),
    ("digits-brightness-2.5", {}, "severity '2.5'"),
    ("digits-brightness-x", {}, "severity 'x'"),
    ("digits-0to4-brightness-1", {}, "unknown task"),
    ("digits", {"resolution": 7}, "resolution 7"),
    ("digits", {"resolution": 16.0}, "resolution 16.0"),
    ("digits", {"channels": 0}, "channels 0"),
    ("digits", {"seed": -1}, "seed -1"),
    ("digits", {"eval_fraction": 0.0}, "eval_fraction 0.0"),
    ("digits", {"eval_fraction": 1.0}, "eval_fraction 1.0"),
    ("digits", {"eval_fraction": -0.2}, "eval_fraction -0.2"),
    ("digits", {"eval_fraction": float("nan")}, "eval_fraction nan"),
    ("digits", {"eval_fraction": 0.999}, "no training image"),
    ("digits", {"train_size": 0}, "train_size 0"),
    ("digits", {"train_size": 1439}, "exceeds the 1438 training images"),
    ("digits-unseen", {"train_size": 100_000}, "train_size 100000"),
    ("digits", {"train_size": 2.5}, "train_size 2.5"),
])
def test_bad_input_is_one_line_cost_model_error(name: str, kwargs: dict, words: str) -> None:
    arguments = {"resolution": 8, **kwargs}
    with pytest.raises(CostModelError) as caught:
        load_task(name, **arguments)
    message = str(caught.value)
    assert words in message and "\n" not in message


def test_bad_corruption_arguments_are_one_line_errors() -> None:
    for corruption, severity in (("fog", 1), ("contrast", 0), ("contrast", 2.0), ("contrast", True)):
        with pytest.raises(CostModelError) as caught:
            corrupt(mid_grey(1, 4), corruption, severity, np.random.default_rng(0))
        assert "\n" not in str(caught.value)
