// Batch normalisation of each channel over the batch and the pixels (minirnng.layers.BatchNorm2d).
//
//   x, y, xhat, dy, dx (N, C, P) scalar_t, P = H*W, count = N*P values per channel
//   mean_c = sum x / count       var_c = sum (x - mean_c)^2 / count
//   xhat = (x - mean_c) / sqrt(var_c + eps)          y = weight_c xhat + bias_c
//   dx = weight_c / sqrt(var_c + eps) * (dy - sum dy / count - xhat * sum (dy xhat) / count)
//
// Forward (training), after sums = channel_sum(x) (reduce.cu):
//   batch_norm_centred_squares: thread (c, chunk) adds (x - mean_c)^2 over the elements
//     m = chunk, chunk + chunks, ... of channel c (channel_chunks.cuh), as channel_sum_partial
//     does, into partial[c*chunks + chunk]; channel_sum_finish (reduce.cu)
//     then gives the per-channel sums. Launch: grid blocks_for(C*chunks), block (256,).
//   batch_norm_statistics: thread c writes mean_c and var_c and, when track is nonzero, moves
//     running_mean and running_var towards them by momentum. Launch: grid blocks_for(C), block (256,).
//   batch_norm_forward: thread i normalises element i; xhat may be nullptr (inference, where mean
//     and var are the running statistics and nothing is kept for backward).
//     Launch: grid blocks_for(N*C*P), block (256,).
// Backward:
//   batch_norm_gradient_sums: thread (c, chunk) adds dy and dy * xhat as above, into
//     partial[c*chunks + chunk] and partial[(C + c)*chunks + chunk]; channel_sum_finish over 2C
//     rows gives sums = [sum dy (C), sum dy xhat (C)], which are also dbias and dweight.
//     Launch: grid blocks_for(C*chunks), block (256,).
//   batch_norm_backward: thread i writes dx for element i. Launch: grid blocks_for(N*C*P), block (256,).
//
// The sums are accumulated in double even in the float32 variant, as in reduce.cu: a float
// accumulator over a million pixels drifts, and these reductions are bound by memory traffic.

#include "channel_chunks.cuh"

extern "C" __global__ void batch_norm_centred_squares(const scalar_t* __restrict__ x,
                                                      const scalar_t* __restrict__ sums,
                                                      scalar_t* __restrict__ partial,
                                                      int N, int C, int P, int chunks) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= (long long)C * chunks) return;
    const ChannelChunk at = channel_chunk(thread, N, P, chunks);
    const double mean = (double)sums[at.c] / (double)at.count;
    double total = 0;
    for (long long m = at.chunk; m < at.count; m += chunks) {
        const double centred = (double)x[channel_element(m, at.c, C, P)] - mean;
        total += centred * centred;
    }
    partial[thread] = (scalar_t)total;
}

extern "C" __global__ void batch_norm_statistics(const scalar_t* __restrict__ sums,
                                                 const scalar_t* __restrict__ squares,
                                                 scalar_t* __restrict__ mean, scalar_t* __restrict__ variance,
                                                 scalar_t* __restrict__ running_mean,
                                                 scalar_t* __restrict__ running_var,
                                                 int C, int count, scalar_t momentum, int track) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const scalar_t batch_mean = (scalar_t)((double)sums[c] / (double)count);
    const scalar_t batch_variance = (scalar_t)((double)squares[c] / (double)count);
    mean[c] = batch_mean;
    variance[c] = batch_variance;
    if (track) {
        running_mean[c] += momentum * (batch_mean - running_mean[c]);
        running_var[c] += momentum * (batch_variance - running_var[c]);
    }
}

extern "C" __global__ void batch_norm_forward(const scalar_t* __restrict__ x, const scalar_t* __restrict__ mean,
                                              const scalar_t* __restrict__ variance,
                                              const scalar_t* __restrict__ weight,
                                              const scalar_t* __restrict__ bias,
                                              scalar_t* __restrict__ xhat, scalar_t* __restrict__ y,
                                              int C, int P, int n, scalar_t eps) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int c = (int)((i / P) % C);
    const scalar_t normalised = (x[i] - mean[c]) / sqrt(variance[c] + eps);
    if (xhat != nullptr) xhat[i] = normalised;
    y[i] = weight[c] * normalised + bias[c];
}

extern "C" __global__ void batch_norm_gradient_sums(const scalar_t* __restrict__ dy,
                                                    const scalar_t* __restrict__ xhat,
                                                    scalar_t* __restrict__ partial,
                                                    int N, int C, int P, int chunks) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= (long long)C * chunks) return;
    const ChannelChunk at = channel_chunk(thread, N, P, chunks);
    double total = 0, weighted = 0;
    for (long long m = at.chunk; m < at.count; m += chunks) {
        const long long index = channel_element(m, at.c, C, P);
        total += (double)dy[index];
        weighted += (double)dy[index] * (double)xhat[index];
    }
    partial[thread] = (scalar_t)total;
    partial[(long long)C * chunks + thread] = (scalar_t)weighted;
}

extern "C" __global__ void batch_norm_backward(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ xhat,
                                               const scalar_t* __restrict__ sums,
                                               const scalar_t* __restrict__ variance,
                                               const scalar_t* __restrict__ weight, scalar_t* __restrict__ dx,
                                               int C, int P, int count, int n, scalar_t eps) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int c = (int)((i / P) % C);
    const scalar_t mean_dy = sums[c] / (scalar_t)count;
    const scalar_t mean_dy_xhat = sums[C + c] / (scalar_t)count;
    dx[i] = weight[c] / sqrt(variance[c] + eps) * (dy[i] - mean_dy - xhat[i] * mean_dy_xhat);
}
