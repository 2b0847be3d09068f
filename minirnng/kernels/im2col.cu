// im2col and col2im: the reshuffles that turn a convolution into one matrix product.
//
// Layouts (all arrays C-contiguous, scalar_t is float or double: the launcher compiles this file
// twice, with -Dscalar_t=float and -Dscalar_t=double):
//   x     (N, C, H, W)               the image side
//   cols  (N, C*k*k, Ho*Wo)          row c*k*k + i*k + j, column oy*Wo + ox holds
//                                    x[n, c, oy*s - p + i, ox*s - p + j]   (0 outside the image)
//   with Ho = (H + 2p - k) / s + 1 and Wo = (W + 2p - k) / s + 1 (integer division).
//
// Conv2d:          forward  y = weight (Cout, C*k*k) @ cols            cols = im2col(x)
//                  backward dx = col2im(weight^T @ dy)
// ConvTranspose2d: forward  y = col2im(weight^T @ x) + bias   on the output grid (H-1)*s - 2p + k
//                  backward dx = weight @ im2col(dy)
// col2im takes an optional bias (C,), added to every pixel of channel c as the sum is written:
// the transposed convolution's bias then costs no launch of its own. Pass a null pointer (None)
// for a plain col2im (a convolution's input gradient).
// (For ConvTranspose2d the "image" x of this file is the layer's *output*; its input plays the
// role of the Ho x Wo column grid. The formulas above agree: (((H-1)*s - 2p + k) + 2p - k)/s + 1 = H.)
//
// col2im is the exact adjoint of im2col: every column entry that im2col copied from x[n, c, y, x]
// is added back there. It is written as a *gather*: one thread per element of x finds the (at most
// ceil(k/s)^2) column entries that came from it and sums them. A scatter (one thread per column
// entry, atomicAdd into x) would need atomics and would sum in a different order on every run; the
// gather needs neither and gives the same bits every time.

#include "strided_taps.cuh"

extern "C" __global__ void im2col(const scalar_t* __restrict__ x, scalar_t* __restrict__ cols,
                                  int N, int C, int H, int W, int k, int s, int p, int Ho, int Wo) {
    // One thread per element of cols, in memory order, so consecutive threads write consecutive
    // addresses (coalesced writes); their reads of x are s apart, mostly in the same cache lines.
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)N * C * k * k * Ho * Wo;
    if (thread >= total) return;
    const int index = (int)thread;

    const int ox = index % Wo;
    const int oy = (index / Wo) % Ho;
    const int row = (index / (Wo * Ho)) % (C * k * k);
    const int n = index / (Wo * Ho * C * k * k);
    const int j = row % k;
    const int i = (row / k) % k;
    const int c = row / (k * k);

    const int y = oy * s - p + i;
    const int xx = ox * s - p + j;
    const bool inside = y >= 0 && y < H && xx >= 0 && xx < W;
    cols[index] = inside ? x[((n * C + c) * H + y) * W + xx] : (scalar_t)0;
}

extern "C" __global__ void col2im(const scalar_t* __restrict__ cols, const scalar_t* __restrict__ bias,
                                  scalar_t* __restrict__ x,
                                  int N, int C, int H, int W, int k, int s, int p, int Ho, int Wo) {
    // One thread per element of x, in memory order: each sums the column entries that im2col
    // copied from it (plus bias[c] when a bias is given).
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)N * C * H * W;
    if (thread >= total) return;
    const int index = (int)thread;

    const int xx = index % W;
    const int y = (index / W) % H;
    const int c = (index / (W * H)) % C;
    const int n = index / (W * H * C);

    // x[y, xx] was copied to window (oy, ox) at offset (i, j) exactly when y = oy*s - p + i and
    // xx = ox*s - p + j: strided_taps lists those (i, oy) and (j, ox) pairs.
    const scalar_t* column_block = cols + (long long)n * C * k * k * Ho * Wo;
    const StridedTaps rows = strided_taps(y + p, k, s, Ho);
    const StridedTaps columns = strided_taps(xx + p, k, s, Wo);
    scalar_t sum = bias == nullptr ? (scalar_t)0 : bias[c];
    for (int a = 0; a < rows.count; ++a) {
        const int i = rows.first_tap + a * s, oy = rows.first_window - a;
        for (int b = 0; b < columns.count; ++b) {
            const int j = columns.first_tap + b * s, ox = columns.first_window - b;
            const int row = (c * k + i) * k + j;
            sum += column_block[row * Ho * Wo + oy * Wo + ox];
        }
    }
    x[index] = sum;
}
