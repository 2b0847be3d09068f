"""Layers with explicit forward and backward, on NumPy and on raw CUDA kernels.

Every layer follows the protocol of :mod:`minirnng.layers.base`. The naive twins, written as
loops that read like the equations, are in :mod:`minirnng.layers.naive`.
"""

from .activations import ReLU, Sigmoid, Tanh
from .base import Layer
from .conv import Conv2d, ConvTranspose2d
from .normalization import BatchNorm2d
from .pool import MaxPool2d
from .recurrent import (DIRECTIONS, FourWayGatedRNN, FourWaySpatialRNN, GatedSpatialRNN, SpatialRNN,
                        clip_recurrent_singular_values, constrain_recurrent_weight, project_recurrent_weight)

__all__ = ["Layer", "Conv2d", "ConvTranspose2d", "BatchNorm2d", "MaxPool2d", "ReLU", "Sigmoid", "Tanh",
           "DIRECTIONS", "GatedSpatialRNN", "FourWayGatedRNN", "SpatialRNN", "FourWaySpatialRNN",
           "constrain_recurrent_weight", "project_recurrent_weight", "clip_recurrent_singular_values"]
