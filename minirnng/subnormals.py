"""Subnormal numbers in the weights, and why minirnng sets them to zero.

A float32 is *subnormal* when it is nonzero and smaller in magnitude than the smallest normal number
(``numpy.finfo(numpy.float32).tiny``, about 1.2e-38; 2.2e-308 in float64). On x86 CPUs every
multiplication by one leaves the fast path for microcode and costs tens to hundreds of cycles.

Weight decay puts them into trained networks. The weights into and out of a channel that no longer
receives a gradient (a ReLU that never fires) feel only the decay, which shrinks them geometrically:
after 250 epochs some were down to 2e-43. Such a weight contributes nothing, yet every convolution that
reads it slows down: CNN-Deep, trained that way, had 3,098 of them and took 19.7 ms an image
instead of 5.2 ms with them set to zero, with the same label at every pixel (docs/results.md).

So subnormal weights are set to zero, which is where the decay takes them anyway, in two places:

- after every optimizer step (:meth:`minirnng.optim.Optimizer.step`), so that no weight a network
  trained with this version learns is one (a batch normalisation's running statistics are not the
  optimizer's and are left alone while training; they fold into the weights at the end);
- when parameters are loaded into a model (:meth:`minirnng.models.base.Model.load_params`), so
  that a checkpoint saved before that, or by another program, runs at full speed too. The file is
  never changed; in the model each value moves by less than 1.2e-38.
"""

import numpy

from . import backend


def flush_subnormals(array):
    """Set the subnormal entries of a float array (nonzero, smaller in magnitude than the dtype's
    smallest normal number) to a zero of their sign, in place (zeros stay as they are, -0.0 too,
    and NaN stays NaN: each entry is multiplied by 0 or 1, not overwritten; CuPy's ufuncs take no
    ``where``). No host synchronisation: on the GPU it is one product per array."""
    xp = backend.get_array_module(array)
    xp.multiply(array, xp.abs(array) >= numpy.finfo(array.dtype).tiny, out=array)


def count_subnormals(array):
    """How many entries of a float array are subnormal (an int; on the GPU this synchronises)."""
    xp = backend.get_array_module(array)
    magnitude = xp.abs(array)
    return int(xp.count_nonzero((magnitude > 0) & (magnitude < numpy.finfo(array.dtype).tiny)))
