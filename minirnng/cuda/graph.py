"""Inference replayed from a CUDA graph: ``model.predict`` without Python between the kernels.

At batch 1 RNN-G's ``predict`` is 14 small kernel launches (11 of minirnng's, the split's 2 copies and
the arg-max), and the Python around each launch (the layer, the argument checks, CuPy's launch path)
costs more than the kernel itself: on an H200 an eager ``predict`` took 0.40 ms, of which the GPU
needs about 0.30, the graph replay's time (docs/benchmarks.md). A CUDA
graph records the launches once and replays them with one call, so the time per image becomes the
GPU's::

    from minirnng.cuda.graph import CapturedPredict

    captured = CapturedPredict(model, (1, 3, 128, 128))   # model on the cupy backend
    labels = captured(images)     # images: a CuPy array of that shape and dtype; labels (1, 128, 128)

What makes a replay correct, and what this class does for it:

* **Fixed addresses.** The graph reads its input from, and writes its labels to, the addresses it
  was recorded with. So ``captured(images)`` copies ``images`` into the recorded input buffer,
  replays, and returns a *copy* of the recorded labels (a new array each call). Parameters are
  read where they live: updating them in place (an optimizer step, ``load_params``) is seen by
  the next replay.
* **A private memory pool.** The intermediate arrays of the recorded pass are freed when the pass
  ends, but the graph writes to them at every replay. They come from a memory pool of their own,
  which nothing else allocates from, so no array of yours is ever placed where a replay writes.
* **No library calls.** CuPy cannot record cuBLAS calls, so during the recording every convolution
  takes the direct kernels (``conv_direct.cu``, ``gpu_algorithm = "direct"``), which the
  convolutions choose at small batches anyway. Their setting is restored afterwards.
* **Streams.** Replays run on a stream of their own, ordered after the work already queued on
  the caller's stream, and the caller's stream waits for the replay before it reads the labels.

Only the kernel path on a real GPU can be captured: on NumPy (or the CUDA emulator) there is
nothing to capture, and the constructor says so.
"""

import numpy

from .. import backend


class CapturedPredict:
    """``model.predict`` for input arrays of one ``shape`` and ``dtype``, recorded once into a CUDA
    graph and replayed by each call. ``model``'s parameters must be on the GPU (a model built on
    the cupy backend). Returns labels (N, H, W) as a new CuPy array per call."""

    def __init__(self, model, shape, dtype=numpy.float32):
        usable, reason = backend.cupy_status()
        if not usable:
            raise backend.BackendError(f"CapturedPredict records CUDA kernels into a graph and needs a GPU, but "
                                       f"{reason}")
        import cupy

        parameters = list(model.params().values())
        if not parameters or not all(backend.is_cupy_array(value) for value in parameters):
            raise ValueError(f"CapturedPredict: the parameters of {type(model).__name__} are not on the GPU; "
                             "build or load the model inside minirnng.backend.use('cupy') "
                             "(or with MINIRNNG_BACKEND=cupy)")
        shape = tuple(int(size) for size in shape)
        if len(shape) != 4:
            raise ValueError(f"CapturedPredict: shape must be (N, 3, H, W), got {shape}")
        self.model = model
        self.shape = shape
        self.dtype = numpy.dtype(dtype)
        self._pool = cupy.cuda.MemoryPool()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._graph, self._images, self._labels = self._record(cupy)

    def _record(self, cupy):
        convolutions = [layer for layer in self.model.layers.values() if hasattr(layer, "gpu_algorithm")]
        saved = [layer.gpu_algorithm for layer in convolutions]
        try:
            for layer in convolutions:
                layer.gpu_algorithm = "direct"
            with backend.use("cupy"), cupy.cuda.using_allocator(self._pool.malloc), self._stream:
                images = cupy.zeros(self.shape, dtype=self.dtype)
                # One eager pass first: it compiles the kernels, builds what the layers keep per image
                # size (the scans' geometry), and leaves the pool holding every block the pass needs,
                # so the recorded pass allocates nothing new.
                self.model.predict(images)
                self._stream.synchronize()
                self._stream.begin_capture()
                try:
                    labels = self.model.predict(images)
                except BaseException as error:
                    self._end_failed_capture()
                    raise RuntimeError(f"CapturedPredict: recording {type(self.model).__name__}.predict into a "
                                       f"CUDA graph failed ({type(error).__name__}: {error})") from error
                graph = self._stream.end_capture()
        finally:
            for layer, algorithm in zip(convolutions, saved):
                layer.gpu_algorithm = algorithm
        return graph, images, labels

    def _end_failed_capture(self):
        try:
            self._stream.end_capture()
        except Exception:  # the capture is already invalidated; ending it is all that is left to do
            pass

    def __call__(self, images):
        """images (N, 3, H, W), a CuPy array of the recorded shape and dtype -> labels (N, H, W)."""
        import cupy

        if not backend.is_cupy_array(images):
            raise TypeError(f"CapturedPredict: images must be a CuPy array on the GPU, got {type(images).__name__}; "
                            "move them with minirnng.backend.to_device (inside backend.use('cupy'))")
        if tuple(images.shape) != self.shape or images.dtype != self.dtype:
            raise ValueError(f"CapturedPredict was recorded for images {self.shape} {self.dtype}, got "
                             f"{tuple(images.shape)} {images.dtype}; record another one for that shape")
        caller = cupy.cuda.get_current_stream()
        self._stream.wait_event(caller.record())
        with self._stream:
            self._images[...] = images
            self._graph.launch(self._stream)
            labels = self._labels.copy()
        caller.wait_event(self._stream.record())
        return labels

    def __repr__(self):
        return f"CapturedPredict({type(self.model).__name__}, shape={self.shape}, dtype={self.dtype.name})"
