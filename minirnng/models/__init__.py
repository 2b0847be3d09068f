"""The paper's models: RNN-G and its baselines (stage 1), the component networks (stage 2), checkpoints."""

from .baselines import CNNCRF, CNNDeep, CNNS, PlainRNN
from .checkpoint import CheckpointError, load_arrays, load_model
from .crf import DenseCRF
from .rnng import RNNG

#: architecture name (as on the command line and in checkpoints) -> model class
ARCHITECTURES = {cls.architecture: cls for cls in (RNNG, CNNS, CNNDeep, PlainRNN, CNNCRF)}

__all__ = ["RNNG", "CNNS", "CNNDeep", "PlainRNN", "CNNCRF", "DenseCRF", "ARCHITECTURES",
           "load_model", "load_arrays", "CheckpointError"]
