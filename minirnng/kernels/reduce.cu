// Sums that several layers need: per-channel sums over batch and pixels, and sums over a leading axis.
//
// channel_sum: x of shape (N, C, P) -> out of shape (C,), out[c] = sum over n, q of x[n, c, q].
//   - the bias gradient of Conv2d / ConvTranspose2d: x = dy (N, C, Ho*Wo);
//   - the loss totals: N = 1, C = 2, x = the per-pixel rows (weighted loss, weight);
//   - the recurrent layers' db: N = 1, C = D*C, P = N*H*W, x = their channel-major e array.
//
// Without shared memory a block cannot combine its threads' sums, so the reduction takes two
// launches (two passes), each thread summing serially:
//   pass 1, channel_sum_partial: thread (c, chunk) for chunk in [0, chunks) sums the elements
//     m = chunk, chunk + chunks, chunk + 2*chunks, ... of the N*P elements of channel c (element m
//     is x[m / P, c, m % P]; channel_chunks.cuh) and writes partial[c*chunks + chunk]. Threads next
//     to each other take elements next to each other (m and m+1), so their reads are coalesced.
//     Launch: grid blocks_for(C*chunks), block (256,). chunks = min(1024, N*P) is a good choice:
//     enough threads to fill a GPU, and each still sums N*P/chunks elements.
//   pass 2, channel_sum_finish: thread r for r in [0, rows) sums partial[r*chunks .. r*chunks+chunks)
//     into out[r]; rows = C.  Launch: grid blocks_for(rows), block (256,).
// Partial sums are accumulated in double even in the float32 variant: a float accumulator over
// millions of pixels drifts by more than 1e-6 relative, and the reduction is bound by memory
// traffic, not arithmetic, so the double adds cost nothing measurable. The order of additions is
// fixed by (chunks, the sizes), so the result is the same bits on every run (no atomics).
//
// sum_first_axis: x of shape (D, n) -> out (n), out[i] = sum over d of x[d, i]: the four
// directions' dx and dg of the four-way recurrent layer. Launch: grid blocks_for(n), block (256,).

#include "channel_chunks.cuh"

extern "C" __global__ void channel_sum_partial(const scalar_t* __restrict__ x,
                                               scalar_t* __restrict__ partial,
                                               int N, int C, int P, int chunks) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= (long long)C * chunks) return;
    const ChannelChunk at = channel_chunk(thread, N, P, chunks);
    double total = 0;
    for (long long m = at.chunk; m < at.count; m += chunks) total += (double)x[channel_element(m, at.c, C, P)];
    partial[thread] = (scalar_t)total;
}

extern "C" __global__ void channel_sum_finish(const scalar_t* __restrict__ partial,
                                              scalar_t* __restrict__ out, int rows, int chunks) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= rows) return;
    double total = 0;
    for (int chunk = 0; chunk < chunks; ++chunk) {
        total += (double)partial[thread * chunks + chunk];
    }
    out[thread] = (scalar_t)total;
}

extern "C" __global__ void sum_first_axis(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                                          int D, int n) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= n) return;
    scalar_t total = 0;
    for (int d = 0; d < D; ++d) {
        total += x[(long long)d * n + thread];
    }
    out[thread] = total;
}
