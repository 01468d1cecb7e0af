"""The input's shape is part of the configuration: images of ``channels`` x resolution x
resolution (a grey-scale or thermal sensor has 1 channel, RGB + depth 4), predicted equal to the
live measurement, and a model built for another channel count refused naming the channels."""

from __future__ import annotations

import pytest
from torch import nn

import costmodel
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.prediction import predict_config

from engine_live import assert_matches, measure_module


def _sensor_cnn(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


@pytest.mark.parametrize("channels", [1, 4])
def test_a_model_of_any_channel_count_is_predicted_as_measured(channels):
    predicted = costmodel.predict(_sensor_cnn(channels), "fft", batch=2, resolution=8, channels=channels)
    assert predicted.config.channels == channels
    assert_matches(predicted, measure_module(lambda: _sensor_cnn(channels), batch=2, resolution=8,
                                             channels=channels))


def test_the_images_bytes_follow_the_channels():
    one, four = (costmodel.predict(_sensor_cnn(1), "fft", batch=2, resolution=8, channels=1).memory["OTH"],
                 costmodel.predict(_sensor_cnn(4), "fft", batch=2, resolution=8, channels=4).memory["OTH"])
    assert four - one == 2 * 3 * 8 * 8 * 4  # the images: batch x 3 more channels x pixels x 4 bytes


def test_a_torchvision_model_fed_another_channel_count_is_refused_naming_it():
    with pytest.raises(CostModelError, match=r"at node 'model_conv1' .*channels=1"):
        predict_config(StepConfig(model="resnet18", channels=1, resolution=32))
