// Elementwise activations, forward and backward, on flat arrays of n elements.
//
// Each backward is written from the forward's *output* y, which is what the layer keeps:
//   ReLU     y = max(x, 0)          dx = dy * (y > 0)
//   sigmoid  y = 1 / (1 + e^-x)     dx = dy * y * (1 - y)
//   tanh     y = tanh(x)            dx = dy * (1 - y^2)
// relu_backward can equally be given the forward's input x instead of y (x > 0 exactly when
// relu(x) > 0), so a layer may keep whichever it already has.
//
// Launch (every kernel): one thread per element, grid blocks_for(n), block (256,).
// In-place use (y written over x, or dx over dy) is allowed: each thread reads its own element
// before writing it and touches no other. That is why these pointers are not marked __restrict__:
// in place, two of them point at the same memory, which __restrict__ would promise never happens.

extern "C" __global__ void relu_forward(const scalar_t* x, scalar_t* y, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const scalar_t v = x[i];
    // Written "v < 0 ? 0 : v" rather than "v > 0 ? v : 0" so that a NaN passes through, as in
    // numpy.maximum and PyTorch: a NaN hidden by the ReLU would be much harder to track down.
    y[i] = v < 0 ? (scalar_t)0 : v;
}

extern "C" __global__ void relu_backward(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dx[i] = y[i] > 0 ? dy[i] : (scalar_t)0;
}

extern "C" __global__ void sigmoid_forward(const scalar_t* x, scalar_t* y, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const scalar_t v = x[i];
    // exp of a large positive argument overflows to inf; take exp of -|v| only, which lies in
    // (0, 1], and pick the form of the sigmoid that uses it.
    const scalar_t e = exp(-fabs(v));
    y[i] = v >= 0 ? (scalar_t)1 / ((scalar_t)1 + e) : e / ((scalar_t)1 + e);
}

extern "C" __global__ void sigmoid_backward(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const scalar_t s = y[i];
    dx[i] = dy[i] * s * ((scalar_t)1 - s);
}

extern "C" __global__ void tanh_forward(const scalar_t* x, scalar_t* y, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    y[i] = tanh(x[i]);
}

extern "C" __global__ void tanh_backward(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const scalar_t t = y[i];
    dx[i] = dy[i] * ((scalar_t)1 - t * t);
}
