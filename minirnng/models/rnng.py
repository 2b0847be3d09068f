"""RNN-G, the paper's stage-1 network: a shallow CNN, a gated four-way spatial RNN, three heads.

The exact network (the architecture spec), for a 3 x 128 x 128 input::

    conv1    Conv2d 3->16, 5x5, pad 2, ReLU               16 x 128 x 128
    pool2    MaxPool 2x2                                  16 x 64 x 64
    conv3    Conv2d 16->32, 3x3, pad 1, ReLU              32 x 64 x 64
    pool4    MaxPool 2x2                                  32 x 32 x 32
    conv5    Conv2d 32->32, 3x3, pad 1, ReLU              32 x 32 x 32
    deconv6  ConvTranspose2d 32->16, 4x4, s2, p1          16 x 64 x 64
    split    X = deconv6[:, :8],  G = sigmoid(deconv6[:, 8:])
    rnn      FourWayGatedRNN(8) on (X, G)                 8 x 64 x 64
    conv8    Conv2d 8->K, 1x1                             K x 64 x 64
    deconv9  ConvTranspose2d K->K, 4x4, s2, p1            logits K x 128 x 128
    coarse   Conv2d 8->K, 1x1 on X                        coarse K x 64 x 64
    edge     Conv2d 8->1, 1x1 on G                        edge   1 x 64 x 64

relu1 and relu3 run *after* the pooling that follows them (:attr:`RNNG.trunk`): max pooling
commutes with the ReLU, ``max(relu(a), relu(b)) = relu(max(a, b))``, and so do the gradients, so
the outputs and gradients are the same bits, and the ReLU touches a quarter of the pixels.

:class:`RNNG` implements the shared trunk (conv1 .. deconv6), the split, and the three heads;
the part between the split and conv8 is :meth:`RNNG.propagate` / :meth:`RNNG.propagate_backward`,
which the baselines of :mod:`minirnng.models.baselines` replace.
"""

import numpy

from .. import backend
from ..layers import BatchNorm2d, Conv2d, ConvTranspose2d, MaxPool2d, ReLU, Sigmoid
from ..layers.base import check_positive_int, random_generator
from ..layers.normalization import fold_into_convolution
from ..layers.recurrent import STABILITY_RULES, FourWayGatedRNN, constrain_recurrent_weight
from .base import Model, infer_chain


class RNNG(Model):
    """The paper's RNN-G (Figure 1): parameters and outputs as in the module docstring.

    n_classes : K, 3 for LFW-PL (background, skin, hair), 11 for HELEN.
    hidden : channels of X and of G (8 in the paper); deconv6 has 2 * hidden outputs.
    gate_bias : initial bias of deconv6's gate half, so that g = sigmoid(.) starts near
        sigmoid(gate_bias): propagation is open from the first step and the edge loss learns
        where to close it.
    rng : seed or numpy.random.Generator for the initial weights; dtype : float32 or float64.
    batch_norm : a training device, not the spec's network: a :class:`~minirnng.layers.BatchNorm2d`
        after each of conv1, conv3 and conv5 (``bn1``, ``bn3``, ``bn5``, before the pooling and
        the ReLU). ``forward`` normalises by the batch's statistics, ``infer`` by the running
        ones; :meth:`folded` returns the spec's network with the same ``infer``.
    """

    architecture = "rnng"
    output_names = ("logits", "coarse", "edge")
    #: the layers before the split, in the order they run: each ReLU after the pooling that follows
    #: it, which gives the same result on a quarter of the pixels (see the module docstring)
    trunk = ("conv1", "pool2", "relu1", "conv3", "pool4", "relu3", "conv5", "relu5", "deconv6")

    #: the convolutions that ``batch_norm=True`` normalises, each with the name of its BatchNorm2d
    NORMALIZED = {"conv1": "bn1", "conv3": "bn3", "conv5": "bn5"}

    def __init__(self, n_classes=3, hidden=8, rng=None, dtype=numpy.float32, gate_bias=0.0, batch_norm=False):
        super().__init__(n_classes, dtype)
        self.hidden = check_positive_int(hidden, type(self).__name__, "hidden")
        if isinstance(gate_bias, bool) or not isinstance(gate_bias, (int, float, numpy.integer, numpy.floating)):
            raise TypeError(f"{type(self).__name__}: gate_bias must be a number, got {gate_bias!r}")
        self.gate_bias = float(gate_bias)
        if not numpy.isfinite(self.gate_bias):
            raise ValueError(f"{type(self).__name__}: gate_bias must be a finite number, got {gate_bias!r}")
        if not isinstance(batch_norm, (bool, numpy.bool_)):
            raise TypeError(f"{type(self).__name__}: batch_norm must be True or False, got {batch_norm!r}")
        self.batch_norm = bool(batch_norm)
        rng = random_generator(rng, type(self).__name__)
        k, h, dt = self.n_classes, self.hidden, self.dtype
        self.layers = {
            "conv1": Conv2d(3, 16, 5, padding=2, rng=rng, dtype=dt),
            "relu1": ReLU(),
            "pool2": MaxPool2d(2),
            "conv3": Conv2d(16, 32, 3, padding=1, rng=rng, dtype=dt),
            "relu3": ReLU(),
            "pool4": MaxPool2d(2),
            "conv5": Conv2d(32, 32, 3, padding=1, rng=rng, dtype=dt),
            "relu5": ReLU(),
            "deconv6": ConvTranspose2d(32, 2 * h, 4, stride=2, padding=1, rng=rng, dtype=dt),
            "gate": Sigmoid(),
        }
        self.layers.update(self.build_propagation(rng))
        self.layers.update({
            "conv8": Conv2d(h, k, 1, rng=rng, dtype=dt),
            "deconv9": ConvTranspose2d(k, k, 4, stride=2, padding=1, rng=rng, dtype=dt),
            "coarse": Conv2d(h, k, 1, rng=rng, dtype=dt),
            "edge": Conv2d(h, 1, 1, rng=rng, dtype=dt),
        })
        self.initialize(rng)
        self.layers["deconv6"].params["bias"][h:] = self.gate_bias
        if self.batch_norm:
            self.add_batch_norm()

    def add_batch_norm(self):
        """Put a BatchNorm2d after each convolution of :attr:`NORMALIZED`, in the layers and the trunk."""
        layers, trunk = {}, []
        for name, layer in self.layers.items():
            layers[name] = layer
            if name in self.NORMALIZED:
                layers[self.NORMALIZED[name]] = BatchNorm2d(layer.out_channels, dtype=self.dtype)
        for name in self.trunk:
            trunk.append(name)
            if name in self.NORMALIZED:
                trunk.append(self.NORMALIZED[name])
        self.layers, self.trunk = layers, tuple(trunk)

    def initialize(self, rng):
        """He initialisation (He et al. 2015) for every convolution, zero biases.

        Weights are drawn from N(0, gain^2 / fan_in) with gain sqrt(2) where a ReLU follows (it
        halves the second moment) and 1 elsewhere, so that the scale of the signal is kept from
        layer to layer at the start. PyTorch's default for a single layer, U(+-1/sqrt(fan_in)), has
        a sixth of that variance: through five layers the signal shrinks ~90-fold and training
        starts far slower (docs/training.md). The recurrent layers keep their own initialisation.
        """
        rectified = {"conv1", "conv3", "conv5", "deep1", "deep2"}
        for name, layer in self.layers.items():
            if not isinstance(layer, (Conv2d, ConvTranspose2d)):
                continue
            weight = layer.params["weight"]
            # Conv2d weights are (out, in, k, k), ConvTranspose2d (in, out, k, k): fan-in is what
            # sums into one output, in * k * k for a convolution, and in * k * k / stride^2 for a
            # transposed convolution (each output reads only every stride-th kernel tap).
            if isinstance(layer, ConvTranspose2d):
                fan_in = weight.shape[0] * weight.shape[2] * weight.shape[3] / layer.stride ** 2
            else:
                fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
            gain = numpy.sqrt(2.0) if name in rectified else 1.0
            weight[...] = backend.get_array_module(weight).asarray(rng.normal(0.0, gain / numpy.sqrt(fan_in), weight.shape))
            layer.params["bias"][...] = 0

    def config(self):
        config = {"n_classes": self.n_classes, "hidden": self.hidden, "gate_bias": self.gate_bias}
        if self.batch_norm:  # absent otherwise: the spec's network, whose checkpoints older versions read
            config["batch_norm"] = True
        return config

    def replica(self):
        copy = super().replica()
        for name in self.NORMALIZED.values() if self.batch_norm else ():
            copy.layers[name].tracks_statistics = False  # the model's own copy averages the statistics
        return copy

    def folded(self):
        """The model without batch normalisation whose ``infer`` equals this one's: each BatchNorm2d,
        with its running statistics, folded into the convolution before it
        (:func:`~minirnng.layers.normalization.fold_into_convolution`). A model without it is copied.
        For RNN-G that is the spec's network, which a ``--batch-norm`` run stores as ``best.npz``."""
        with backend.use(backend.matching(next(iter(self.params().values())))):
            plain = type(self)(**{**self.config(), "batch_norm": False}, rng=0, dtype=self.dtype)
        plain.classes = self.classes
        arrays = {name: value for name, value in self.params().items() if name in plain.params()}
        for conv, norm in self.NORMALIZED.items() if self.batch_norm else ():
            layer = self.layers[conv]
            arrays[f"{conv}.weight"], arrays[f"{conv}.bias"] = fold_into_convolution(
                layer.params["weight"], layer.params["bias"], self.layers[norm],
                transposed=isinstance(layer, ConvTranspose2d))
        plain.load_params(arrays, source=f"{type(self).__name__}.folded")
        return plain

    # -- the part the baselines replace -----------------------------------------------------
    def build_propagation(self, rng):
        """The layers between the split and conv8, by name."""
        return {"rnn": FourWayGatedRNN(self.hidden, rng=rng, dtype=self.dtype)}

    def propagate(self, x, g):
        """X (N, hidden, H/2, W/2) and G (same) -> the features conv8 reads (N, hidden, H/2, W/2)."""
        return self.layers["rnn"].forward(x, g)

    def propagate_backward(self, grad):
        """Gradient of propagate's output -> (dX, dG); dG is None when propagation ignores G."""
        return self.layers["rnn"].backward(grad)

    def constrain(self, rule="rescale"):
        """The stability rule of section 3.2, after every optimizer step: each recurrent W is kept
        within a norm bound of 1 (models without a recurrent layer have nothing to do).
        ``rule``: ``"rescale"`` (the spec's: largest absolute row sum at most 1, the whole W divided
        by it), ``"project"`` (the same bound, each row projected onto the L1 ball,
        :func:`~minirnng.layers.recurrent.project_recurrent_weight`) or ``"spectral"`` (another
        bound, spectral norm at most 1, :func:`~minirnng.layers.recurrent.clip_recurrent_singular_values`)."""
        if rule not in STABILITY_RULES:
            raise ValueError(f"{type(self).__name__}.constrain: unknown stability rule {rule!r}; "
                             f"expected one of {', '.join(STABILITY_RULES)}")
        params = self.params()
        for name in self.recurrent_weight_names():
            STABILITY_RULES[rule](params[name])

    def recurrent_weight_names(self):
        """``rnn.<direction>.W`` for the four directions (none for CNN-S and CNN-Deep, which have no
        recurrent layer)."""
        recurrent = self.layers.get("rnn")
        if recurrent is None:
            return []
        return [f"rnn.{name}" for name in recurrent.params if name.endswith("W")]

    def randomize_recurrence(self, rng=None):
        """Give each direction's recurrent W and b distinct random values (W constrained).

        For gradient checks: with the identical initial weights the four directions tie exactly
        at the image corners, where the maximum has a kink that finite differences straddle.
        """
        rng = random_generator(rng, type(self).__name__)
        recurrent = self.layers.get("rnn")
        for name, value in (recurrent.params.items() if recurrent is not None else ()):
            # Drawn on the host (the same values on every backend), then copied to where W lives.
            if name.endswith("W"):
                drawn = constrain_recurrent_weight(rng.standard_normal(value.shape))
            else:
                drawn = 0.5 * rng.standard_normal(value.shape)
            value[...] = backend.get_array_module(value).asarray(drawn)

    # -- forward and backward ---------------------------------------------------------------
    def forward(self, images):
        """images (N, 3, H, W), H and W multiples of 4 -> {"logits", "coarse", "edge"} (see module doc)."""
        L = self.layers
        a = self.check_images(images)
        self.forward_cached = False  # until this pass has filled every cache (it may fail midway)
        for name in self.trunk:
            a = L[name].forward(a)
        xp = backend.get_array_module(a)
        x = xp.ascontiguousarray(a[:, :self.hidden])
        g = L["gate"].forward(xp.ascontiguousarray(a[:, self.hidden:]))
        features = self.propagate(x, g)
        logits = L["deconv9"].forward(L["conv8"].forward(features))
        self.feature_shape = x.shape
        # for figures and notebooks: the label features X, the gate map G and the propagated H
        self.intermediates = {"x": x, "gate": g, "propagated": features}
        outputs = {"logits": logits, "coarse": L["coarse"].forward(x), "edge": L["edge"].forward(g)}
        self.forward_cached = True
        return outputs

    def infer(self, images):
        """``forward(images)["logits"]`` for inference only (no ``backward`` may follow), cheaper:
        images (N, 3, H, W) -> logits (N, K, H, W), the same numbers.

        The coarse and edge heads, which only the training loss reads, are skipped, and the trunk
        runs by :func:`~.base.infer_chain`, which fuses the ReLUs into the convolutions: on the
        kernel path, 11 launches instead of ``forward``'s 16 with the direct convolutions.
        """
        L = self.layers
        self.forward_cached = False
        a = infer_chain(L, self.trunk, self.check_images(images))
        xp = backend.get_array_module(a)
        x = xp.ascontiguousarray(a[:, :self.hidden])
        g = L["gate"].forward(xp.ascontiguousarray(a[:, self.hidden:]))
        logits = L["deconv9"].forward(L["conv8"].forward(self.propagate(x, g)))
        self.clear_caches()
        return logits

    def backward(self, grads, input_gradient=True):
        """grads: dict with any of "logits", "coarse", "edge" -> dimages (N, 3, H, W).

        With ``input_gradient=False`` (training, where nothing needs it) the image gradient is not
        computed and None is returned; the parameter gradients are the same.
        """
        self.check_forward_cached()
        L = self.layers
        xp = backend.get_array_module(next(iter(self.params().values())))
        dx = xp.zeros(self.feature_shape, dtype=self.dtype)
        dg = xp.zeros(self.feature_shape, dtype=self.dtype)
        dlogits = self.upstream(grads, "logits", L["deconv9"].output_shape_seen)
        if dlogits is not None:
            dfeatures = L["conv8"].backward(L["deconv9"].backward(dlogits))
            dx_rnn, dg_rnn = self.propagate_backward(dfeatures)
            dx += dx_rnn
            if dg_rnn is not None:
                dg += dg_rnn
        dcoarse = self.upstream(grads, "coarse", L["coarse"].output_shape_seen)
        if dcoarse is not None:
            dx += L["coarse"].backward(dcoarse)
        dedge = self.upstream(grads, "edge", L["edge"].output_shape_seen)
        if dedge is not None:
            dg += L["edge"].backward(dedge)
        d = xp.concatenate([dx, L["gate"].backward(dg)], axis=1)
        for name in reversed(self.trunk[1:]):
            d = L[name].backward(d)
        L["conv1"].needs_input_grad = input_gradient
        try:
            return L["conv1"].backward(d)
        finally:
            L["conv1"].needs_input_grad = True
