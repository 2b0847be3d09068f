// Direct convolutions: each thread computes one output pixel of one channel by the defining sum,
// with no columns and no matrix product.
//
// Why, beside im2col + cuBLAS (im2col.cu): for a small batch the arithmetic of RNN-G's layers takes
// a few microseconds, and what costs is the number of steps around it. The im2col path is three
// (im2col, the cuBLAS product with its setup, the bias), the direct path one launch with the bias
// added in the same sum. A direct kernel also calls no library, so a stream of them can be captured
// into a CUDA graph (CuPy cannot capture cuBLAS calls). For large batches cuBLAS's tiled products
// reuse each loaded value many times and win; Conv2d and ConvTranspose2d choose between the two by
// the number of multiply-adds (minirnng/layers/conv.py, DIRECT_MAX_MULTIPLY_ADDS).
//
// Both take an int `relu`: when it is non-zero the thread writes max(sum, 0), the ReLU that follows
// the convolution (inference fuses it here and saves the ReLU's launch; training keeps it a layer,
// whose backward needs its own cache).
//
// Layouts (C-contiguous, scalar_t is float or double):
//   conv2d_direct            x (N, C, H, W), weight (O, C, k, k), bias (O,) or null, y (N, O, Ho, Wo)
//                            Ho = (H + 2p - k) / s + 1
//       y[n, o, oy, ox] = bias[o] + sum_{c, i, j} weight[o, c, i, j] * x[n, c, oy*s - p + i, ox*s - p + j]
//                                                   (terms outside the image are zero padding)
//   conv_transpose2d_direct  x (N, C, H, W), weight (C, O, k, k), bias (O,) or null, y (N, O, Ho, Wo)
//                            Ho = (H - 1) * s - 2p + k
//       y[n, o, oy, ox] = bias[o] + sum over (c, i, j, iy, ix) with oy = iy*s - p + i, ox = ix*s - p + j
//                                   of weight[c, o, i, j] * x[n, c, iy, ix]
//       written as a gather, the loop of col2im (strided_taps.cuh): for the output pixel, i runs
//       over (oy + p) mod s in steps of s and iy = (oy + p - i) / s; at most ceil(k/s)^2 taps per
//       input channel.
//
// Threads run over y in memory order: neighbours in a warp share (n, o) and read the same weights
// (one broadcast load) and neighbouring pixels of x.

#include "strided_taps.cuh"

// Where the thread of element `index` of y (N, O, Ho, Wo) writes: y[n, o, oy, ox].
struct OutputPixel {
    int n, o, oy, ox;
};

__device__ __forceinline__ OutputPixel output_pixel(int index, int O, int Ho, int Wo) {
    OutputPixel pixel;
    pixel.ox = index % Wo;
    pixel.oy = (index / Wo) % Ho;
    pixel.o = (index / (Wo * Ho)) % O;
    pixel.n = index / (Wo * Ho * O);
    return pixel;
}

extern "C" __global__ void conv2d_direct(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                         const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                                         int N, int C, int H, int W, int O, int k, int s, int p, int Ho, int Wo,
                                         int relu) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= (long long)N * O * Ho * Wo) return;
    const OutputPixel out = output_pixel((int)thread, O, Ho, Wo);
    const int n = out.n, o = out.o, oy = out.oy, ox = out.ox;

    // The window's rows and columns that fall inside the image: the rest is zero padding.
    const int top = oy * s - p;
    const int left = ox * s - p;
    const int i_begin = top < 0 ? -top : 0;
    const int i_end = top + k > H ? H - top : k;
    const int j_begin = left < 0 ? -left : 0;
    const int j_end = left + k > W ? W - left : k;

    scalar_t sum = bias == nullptr ? (scalar_t)0 : bias[o];
    for (int c = 0; c < C; ++c) {
        const scalar_t* image = x + ((long long)n * C + c) * H * W;
        const scalar_t* taps = weight + ((long long)o * C + c) * k * k;
        for (int i = i_begin; i < i_end; ++i) {
            for (int j = j_begin; j < j_end; ++j) {
                sum += taps[i * k + j] * image[(top + i) * W + left + j];
            }
        }
    }
    y[thread] = relu && sum < (scalar_t)0 ? (scalar_t)0 : sum;
}

extern "C" __global__ void conv_transpose2d_direct(const scalar_t* __restrict__ x,
                                                   const scalar_t* __restrict__ weight,
                                                   const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
                                                   int N, int C, int H, int W, int O, int k, int s, int p,
                                                   int Ho, int Wo, int relu) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= (long long)N * O * Ho * Wo) return;
    const OutputPixel out = output_pixel((int)thread, O, Ho, Wo);
    const int n = out.n, o = out.o, oy = out.oy, ox = out.ox;

    // The input pixels (iy, ix) of x play the part of col2im's windows: the same walk.
    const StridedTaps rows = strided_taps(oy + p, k, s, H);
    const StridedTaps columns = strided_taps(ox + p, k, s, W);
    scalar_t sum = bias == nullptr ? (scalar_t)0 : bias[o];
    for (int c = 0; c < C; ++c) {
        const scalar_t* image = x + ((long long)n * C + c) * H * W;
        const scalar_t* taps = weight + ((long long)c * O + o) * k * k;
        for (int a = 0; a < rows.count; ++a) {
            const int i = rows.first_tap + a * s, iy = rows.first_window - a;
            for (int b = 0; b < columns.count; ++b) {
                const int j = columns.first_tap + b * s, ix = columns.first_window - b;
                sum += taps[i * k + j] * image[iy * W + ix];
            }
        }
    }
    y[thread] = relu && sum < (scalar_t)0 ? (scalar_t)0 : sum;
}
