"""minirnng: face parsing via recurrent propagation (Liu, Shi, Liang and Yang, BMVC 2017), from scratch.

Every layer has an explicit forward and backward, in NumPy and in raw CUDA kernels; no autograd.
"""

__version__ = "0.1.0"
