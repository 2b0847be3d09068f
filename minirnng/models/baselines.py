"""The baselines of the paper's Tables 1 and 2, each RNN-G with its middle replaced.

All keep RNN-G's trunk (conv1 .. deconv6), its split into X and G, and its three heads (logits,
coarse, edge), so that every model is trained by the same loop with the same three losses and
only the propagation differs:

``CNNS``      nothing between the split and conv8: the shallow CNN alone (conv8 reads X).
``CNNDeep``   two more convolutions instead of the recurrence: Conv2d 8->32 and 32->8, 3x3, pad 1,
              each followed by a ReLU (``deep1``, ``deep2``).
``PlainRNN``  four spatially invariant RNNs of eq. 1 (tanh) on X, merged by the maximum (``rnn``).
``CNNCRF``    CNNS, then dense-CRF mean-field inference on its softmax at prediction time
              (:mod:`minirnng.models.crf`); trained exactly as CNNS.
"""

import numpy

from ..layers import Conv2d, ReLU
from ..layers.recurrent import FourWaySpatialRNN
from .crf import DenseCRF
from .rnng import RNNG


class CNNS(RNNG):
    """The shallow CNN of RNN-G without propagation: conv8 reads X directly (Table 1, "CNN-S")."""

    architecture = "cnn-s"

    def build_propagation(self, rng):
        return {}

    def propagate(self, x, g):
        return x

    def propagate_backward(self, grad):
        return grad, None


class CNNDeep(RNNG):
    """RNN-G with the recurrence replaced by two 3x3 convolutions 8->32->8 with ReLUs ("CNN-Deep")."""

    architecture = "cnn-deep"

    def build_propagation(self, rng):
        return {
            "deep1": Conv2d(self.hidden, 32, 3, padding=1, rng=rng, dtype=self.dtype),
            "deep1_relu": ReLU(),
            "deep2": Conv2d(32, self.hidden, 3, padding=1, rng=rng, dtype=self.dtype),
            "deep2_relu": ReLU(),
        }

    def propagate(self, x, g):
        for name in ("deep1", "deep1_relu", "deep2", "deep2_relu"):
            x = self.layers[name].forward(x)
        return x

    def propagate_backward(self, grad):
        for name in ("deep2_relu", "deep2", "deep1_relu", "deep1"):
            grad = self.layers[name].backward(grad)
        return grad, None


class PlainRNN(RNNG):
    """RNN-G with the gated layer replaced by four eq. 1 RNNs (tanh) on X, max-merged ("RNN")."""

    architecture = "rnn"

    def build_propagation(self, rng):
        return {"rnn": FourWaySpatialRNN(self.hidden, rng=rng, dtype=self.dtype)}

    def propagate(self, x, g):
        return self.layers["rnn"].forward(x)

    def propagate_backward(self, grad):
        return self.layers["rnn"].backward(grad), None


class CNNCRF(CNNS):
    """CNN-S followed by dense-CRF mean-field inference on its softmax (Table 1, "CNN-CRF").

    Training is CNN-S's (the CRF has no trained parameters here); :meth:`predict` runs the CRF
    on the softmax of the logits with the image as the bilateral kernel's guide, and
    :meth:`forward` returns the CNN's outputs unchanged so the same losses apply.
    crf : a :class:`DenseCRF`, a dict of its settings (``DenseCRF.config()``, as a checkpoint
        stores them), or None for its defaults.

    The CRF's settings are part of :meth:`config`, so a checkpoint rebuilds this model's own CRF;
    a checkpoint written before they were stored (a config without ``crf``) loads with the
    defaults, which every CNN-CRF had then.
    """

    architecture = "cnn-crf"

    def __init__(self, n_classes=3, hidden=8, rng=None, dtype=numpy.float32, gate_bias=0.0, crf=None,
                 batch_norm=False):
        super().__init__(n_classes, hidden, rng=rng, dtype=dtype, gate_bias=gate_bias, batch_norm=batch_norm)
        if isinstance(crf, dict):
            unknown = sorted(set(crf) - set(DenseCRF.SETTINGS))
            if unknown:
                raise ValueError(f"CNNCRF: unknown CRF setting(s) {unknown}; DenseCRF takes {list(DenseCRF.SETTINGS)}")
            crf = DenseCRF(**crf)
        elif crf is not None and not isinstance(crf, DenseCRF):
            raise TypeError(f"CNNCRF: crf must be a DenseCRF, a dict of its settings or None, got {type(crf).__name__}")
        self.crf = crf or DenseCRF()

    def config(self):
        return {**super().config(), "crf": self.crf.config()}

    def replica(self):
        copy = super().replica()
        copy.crf = self.crf  # no state of its own while it runs: one CRF serves every copy
        return copy

    def folded(self):
        plain = super().folded()
        plain.crf = self.crf
        return plain

    def predict(self, images):
        # the CRF reads the colours in the network's dtype, as the network does (float16 is accepted)
        images = self.check_images(images)
        return self.crf.refine(self.infer(images), images).argmax(axis=1)
