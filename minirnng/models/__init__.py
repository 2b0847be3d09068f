"""The paper's models: RNN-G and its baselines (stage 1), the component networks (stage 2), checkpoints."""

from .baselines import CNNCRF, CNNDeep, CNNS, PlainRNN
from .checkpoint import CheckpointError, load_arrays, load_model
from .crf import DenseCRF
from .rnng import RNNG

#: architecture name (as on the command line and in checkpoints) -> model class
ARCHITECTURES = {cls.architecture: cls for cls in (RNNG, CNNS, CNNDeep, PlainRNN, CNNCRF)}

# Stage 2 (after ARCHITECTURES, which its loader reads): the component networks and the two-stage
# parser are not trained by ``minirnng train``, so they have a registry and a loader of their own;
# ``load_stage2_model`` also reads every stage-1 checkpoint.
from .stage2 import COMPONENT_NETWORKS, EyeBrowNet, MouthNet, NoseNet, TwoStageParser, load_stage2_model  # noqa: E402

__all__ = ["RNNG", "CNNS", "CNNDeep", "PlainRNN", "CNNCRF", "DenseCRF", "ARCHITECTURES",
           "load_model", "load_arrays", "CheckpointError",
           "EyeBrowNet", "NoseNet", "MouthNet", "TwoStageParser", "COMPONENT_NETWORKS", "load_stage2_model"]
