// The spatial RNNs' recurrences (as the spec, rnng-architecture.md, fixes them), forward and backward:
//   gated scan, paper eq. 3:   h_t = x_t + g_t * (W @ h_{t-1} + b)        h_{-1} = 0
//   plain scan, paper eq. 1:   h_t = tanh(x_t + W @ h_{t-1} + b)          h_{-1} = 0
// along every row or column of the image, in any of the four directions, and the four-way max
// merge of the gated layer. x, g: (N, C, H, W); W: (C, C), (W @ v)[c] = sum_k W[c, k] v[k]; b: (C,).
//
// ---- Directions as strides --------------------------------------------------------------------
// A scan visits, in image n, the pixels of one line (a row or a column) one step t at a time.
// Number the H*W pixels of a channel plane q = y*W + x. Every direction is then the same walk
//     q(l, t) = first + l * line_stride + t * step_stride,   l < lines, t < length
// with five integers that Python computes (minirnng.cuda.directions.scan_geometry):
//     direction        lines  length  line_stride  step_stride  first
//     left_to_right      H      W         W            +1        0
//     right_to_left      H      W         W            -1        W-1
//     top_to_bottom      W      H         1            +W        0
//     bottom_to_top      W      H         1            -W        (H-1)*W
// so one kernel serves all four, and the predecessor of pixel q along the scan is q - step_stride.
// The kernels take a small int32 array `geometry` of shape (D, 5), one such row per direction, and
// run D directions in one launch (blockIdx.y = direction): a single layer has D = 1, the four-way
// layer D = 4. One launch instead of four matters at batch 1, where each direction has only N*H
// lines of work and four launches one after another would take four times as long.
// Arrays with a leading D axis hold one slice per direction: weight (D, C, C), bias (D, C),
// h / dh / dx / dg (D, N, C, H, W). The inputs x and g are shared by all directions.
//
// ---- Thread layout: one thread per (direction, image, line), channels in a loop ----------------
// Step t needs all C channels of h_{t-1}, because W @ h mixes channels. The scan is sequential in
// t, so the parallelism is across lines (N * lines per direction) and, at best, channels. A thread
// per (image, line, channel) would have to wait, at every step, for the C-1 threads computing the
// other channels of h_{t-1}: a barrier per step (__syncthreads or warp shuffles), which the CPU
// emulator cannot run (it runs threads one after another) and which costs about as much as the
// C = 8 multiply-adds per channel it would spread out. So one thread owns a whole line and loops
// over channels: per step it does C*C multiply-adds (64 for the RNN-G's hidden size 8), small next
// to the latency of the step's memory reads, which dominates.
// The gated forward scan keeps h_{t-1} in registers when C <= REGISTER_CHANNELS (16; RNN-G has 8):
// the loops over channels run to that compile-time bound, fully unrolled, with `c < C` as a
// predicate, so every array index is a constant and the arrays live in registers. It also loads
// step t+1's x and g while it computes step t, so that their memory latency overlaps the
// arithmetic instead of adding to every step. On an H200 this took the four-way forward at batch 1
// from 337 to 212 microseconds, and at batch 16 from 941 to 362 (docs/benchmarks.md). For larger C
// the thread reads h_{t-1} back from the output array, where it has just written it (a thread
// always sees its own writes): slower, but with no limit on C. Both orders of summation are the
// same (b[c] first, then k = 0, 1, ...), so both give the same bits.
// Consecutive threads take consecutive lines: for top_to_bottom / bottom_to_top that is
// neighbouring columns, so each step's reads are coalesced; for the horizontal directions the
// reads of one warp are W apart, but each cache line fetched then serves the next steps of the
// same thread.
//
// ---- Backward (derivation in docs/kernels.md) -----------------------------------------------------
// Let delta_t = dL/dh_t in full: the upstream dh_t plus what flows back from step t+1.
//   gated:  delta_t = dh_t + W^T (g_{t+1} * delta_{t+1})        (the term is 0 at the last step)
//           dx_t = delta_t,   dg_t = delta_t * (W @ h_{t-1} + b),   e_t = delta_t * g_t,
//           dW = sum over pixels of e_t h_{t-1}^T,   db = sum over pixels of e_t.
//   plain:  u_t = delta_t * (1 - h_t^2),   delta_t = dh_t + W^T u_{t+1},
//           dx_t = u_t,   e_t = u_t,   dW = sum of e_t h_{t-1}^T,   db = sum of e_t.
// The backward kernels run each line from its last step to its first, write dx (and dg), and, for
// the parameter gradients, e_t and h_prev_t = h_{t-1} (0 at the line's first step) in a
// *channel-major* layout (D, C, N, H, W). Then, for each direction d, e[d] and h_prev[d] are
// (C, N*H*W) matrices and
//     dW[d] = e[d] @ h_prev[d]^T        (one batched cupy.matmul over d)
//     db    = channel_sum of e viewed as (1, D*C, N*H*W)      (reduce.cu)
// The sum of dx and dg over the D directions is sum_first_axis in reduce.cu.
//
// ---- Without gates: the plain scan with the identity activation ---------------------------------
// g may be a null pointer (None), meaning g = 1: then the gated scan is h_t = x_t + W h_{t-1} + b,
// eq. 1 with the identity activation (SpatialRNN(activation="identity")), and its backward is the
// one above with g = 1. Pass dg = None too: there is no gate to differentiate.
//
// ---- Launch -----------------------------------------------------------------------------------
// Scans: grid (blocks_for(N * max(H, W)), D), block (256,); a thread whose line index is past its
// direction's N * lines (or whose blockIdx.y is not below D) returns at once.
// Max merge: one thread per element, grid blocks_for(n), block (256,).

#define REGISTER_CHANNELS 16

// The line a thread scans: direction d = blockIdx.y, image n, and the line's first pixel, length
// and step (one row of `geometry`, see "Directions as strides"). False for a thread past the last
// line of its direction (the grid is rounded up to whole blocks), past the last direction, or on
// a line of no pixels or one whose walk leaves the image's HW pixels.
struct ScanLine {
    int d, n, index, length, step, first;   // index: the line's number within its direction
};

__device__ __forceinline__ bool find_scan_line(const int* geometry, int D, int N, int HW, ScanLine* line) {
    const int d = blockIdx.y;
    if (d >= D) return false;
    const int lines = geometry[5 * d];
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= (long long)N * lines) return false;
    line->d = d;
    line->n = (int)(thread / lines);
    line->index = (int)(thread % lines);
    line->length = geometry[5 * d + 1];
    line->step = geometry[5 * d + 3];
    line->first = geometry[5 * d + 4] + line->index * geometry[5 * d + 2];
    if (line->length <= 0) return false;
    // A geometry row that walks off the image (a slip in one's own direction strides) would read and
    // write other images' memory: such a line is skipped, and its output is visibly wrong instead.
    const long long last = line->first + (long long)(line->length - 1) * line->step;
    return line->first >= 0 && line->first < HW && last >= 0 && last < HW;
}

extern "C" __global__ void gated_scan_forward(const scalar_t* __restrict__ x,
                                              const scalar_t* __restrict__ g,
                                              const scalar_t* __restrict__ weight,
                                              const scalar_t* __restrict__ bias,
                                              const int* __restrict__ geometry,
                                              scalar_t* __restrict__ h,
                                              int D, int N, int C, int HW) {
    ScanLine line;
    if (!find_scan_line(geometry, D, N, HW, &line)) return;
    const int d = line.d, n = line.n, length = line.length, step = line.step;

    const scalar_t* W = weight + (long long)d * C * C;
    const scalar_t* b = bias + (long long)d * C;
    const scalar_t* x_image = x + (long long)n * C * HW;                      // x[n]
    const scalar_t* g_image = g == nullptr ? nullptr : g + (long long)n * C * HW;   // g[n]
    scalar_t* h_image = h + ((long long)d * N + n) * C * HW;                   // h[d, n]
    int q = line.first;

    if (C > REGISTER_CHANNELS) {
        for (int t = 0; t < length; ++t, q += step) {
            for (int c = 0; c < C; ++c) {
                scalar_t a = b[c];
                if (t > 0) {
                    for (int k = 0; k < C; ++k) a += W[c * C + k] * h_image[k * HW + q - step];
                }
                const scalar_t gate = g_image == nullptr ? (scalar_t)1 : g_image[c * HW + q];
                h_image[c * HW + q] = x_image[c * HW + q] + gate * a;
            }
        }
        return;
    }

    // h_{t-1}, and this step's x and g, in registers (see the note on registers above).
    scalar_t state[REGISTER_CHANNELS], x_now[REGISTER_CHANNELS], g_now[REGISTER_CHANNELS];
#pragma unroll
    for (int c = 0; c < REGISTER_CHANNELS; ++c) {
        state[c] = (scalar_t)0;
        x_now[c] = c < C ? x_image[c * HW + q] : (scalar_t)0;
        g_now[c] = c < C && g_image != nullptr ? g_image[c * HW + q] : (scalar_t)1;
    }
    for (int t = 0; t < length; ++t, q += step) {
        // Step t+1's inputs are requested now and used one step later.
        scalar_t x_next[REGISTER_CHANNELS], g_next[REGISTER_CHANNELS], next[REGISTER_CHANNELS];
        const bool more = t + 1 < length;
#pragma unroll
        for (int c = 0; c < REGISTER_CHANNELS; ++c) {
            x_next[c] = more && c < C ? x_image[c * HW + q + step] : (scalar_t)0;
            g_next[c] = more && c < C && g_image != nullptr ? g_image[c * HW + q + step] : (scalar_t)1;
        }
#pragma unroll
        for (int c = 0; c < REGISTER_CHANNELS; ++c) {
            next[c] = (scalar_t)0;
            if (c < C) {
                scalar_t a = b[c];
                if (t > 0) {
#pragma unroll
                    for (int k = 0; k < REGISTER_CHANNELS; ++k) {
                        if (k < C) a += W[c * C + k] * state[k];
                    }
                }
                next[c] = x_now[c] + g_now[c] * a;
                h_image[c * HW + q] = next[c];
            }
        }
#pragma unroll
        for (int c = 0; c < REGISTER_CHANNELS; ++c) {
            state[c] = next[c];
            x_now[c] = x_next[c];
            g_now[c] = g_next[c];
        }
    }
}

extern "C" __global__ void gated_scan_backward(const scalar_t* __restrict__ dh,
                                               const scalar_t* __restrict__ g,
                                               const scalar_t* __restrict__ h,
                                               const scalar_t* __restrict__ weight,
                                               const scalar_t* __restrict__ bias,
                                               const int* __restrict__ geometry,
                                               scalar_t* __restrict__ dx,
                                               scalar_t* __restrict__ dg,
                                               scalar_t* __restrict__ e,
                                               scalar_t* __restrict__ h_prev,
                                               int D, int N, int C, int HW) {
    ScanLine line;
    if (!find_scan_line(geometry, D, N, HW, &line)) return;
    const int d = line.d, n = line.n, length = line.length, step = line.step;

    const scalar_t* W = weight + (long long)d * C * C;
    const scalar_t* b = bias + (long long)d * C;
    const long long image = (long long)n * C * HW;                          // g[n]
    const long long stacked = ((long long)d * N + n) * C * HW;              // h[d, n], dh, dx, dg
    const long long channel_major = ((long long)d * C * N + n) * HW;       // e[d, 0, n], h_prev
    const long long plane = (long long)N * HW;   // distance between channels in e and h_prev

    // Start at the last step of the line and walk back to the first.
    int q = line.first + (length - 1) * step;
    for (int t = length - 1; t >= 0; --t, q -= step) {
        for (int c = 0; c < C; ++c) {
            scalar_t delta = dh[stacked + c * HW + q];
            if (t < length - 1) {
                // (W^T e_{t+1})[c]: e_{t+1} was written by this thread one step ago.
                for (int k = 0; k < C; ++k) delta += W[k * C + c] * e[channel_major + k * plane + q + step];
            }
            if (dg != nullptr) {
                scalar_t a = b[c];   // the gate's input, recomputed: W @ h_{t-1} + b
                if (t > 0) {
                    for (int k = 0; k < C; ++k) a += W[c * C + k] * h[stacked + k * HW + q - step];
                }
                dg[stacked + c * HW + q] = delta * a;
            }
            const scalar_t gate = g == nullptr ? (scalar_t)1 : g[image + c * HW + q];
            dx[stacked + c * HW + q] = delta;
            e[channel_major + c * plane + q] = delta * gate;
            h_prev[channel_major + c * plane + q] = t > 0 ? h[stacked + c * HW + q - step] : (scalar_t)0;
        }
    }
}

extern "C" __global__ void tanh_scan_forward(const scalar_t* __restrict__ x,
                                             const scalar_t* __restrict__ weight,
                                             const scalar_t* __restrict__ bias,
                                             const int* __restrict__ geometry,
                                             scalar_t* __restrict__ h,
                                             int D, int N, int C, int HW) {
    ScanLine line;
    if (!find_scan_line(geometry, D, N, HW, &line)) return;
    const int d = line.d, n = line.n, length = line.length, step = line.step;

    const scalar_t* W = weight + (long long)d * C * C;
    const scalar_t* b = bias + (long long)d * C;
    const long long image = (long long)n * C * HW;
    scalar_t* h_image = h + ((long long)d * N + n) * C * HW;

    int q = line.first;
    for (int t = 0; t < length; ++t, q += step) {
        for (int c = 0; c < C; ++c) {
            scalar_t a = x[image + c * HW + q] + b[c];
            if (t > 0) {
                for (int k = 0; k < C; ++k) a += W[c * C + k] * h_image[k * HW + q - step];
            }
            h_image[c * HW + q] = tanh(a);
        }
    }
}

extern "C" __global__ void tanh_scan_backward(const scalar_t* __restrict__ dh,
                                              const scalar_t* __restrict__ h,
                                              const scalar_t* __restrict__ weight,
                                              const int* __restrict__ geometry,
                                              scalar_t* __restrict__ dx,
                                              scalar_t* __restrict__ e,
                                              scalar_t* __restrict__ h_prev,
                                              int D, int N, int C, int HW) {
    ScanLine line;
    if (!find_scan_line(geometry, D, N, HW, &line)) return;
    const int d = line.d, n = line.n, length = line.length, step = line.step;

    const scalar_t* W = weight + (long long)d * C * C;
    const long long stacked = ((long long)d * N + n) * C * HW;
    const long long channel_major = ((long long)d * C * N + n) * HW;
    const long long plane = (long long)N * HW;

    int q = line.first + (length - 1) * step;
    for (int t = length - 1; t >= 0; --t, q -= step) {
        for (int c = 0; c < C; ++c) {
            scalar_t delta = dh[stacked + c * HW + q];
            if (t < length - 1) {
                for (int k = 0; k < C; ++k) delta += W[k * C + c] * e[channel_major + k * plane + q + step];
            }
            const scalar_t value = h[stacked + c * HW + q];
            const scalar_t u = delta * ((scalar_t)1 - value * value);   // through the tanh
            dx[stacked + c * HW + q] = u;
            e[channel_major + c * plane + q] = u;
            h_prev[channel_major + c * plane + q] = t > 0 ? h[stacked + c * HW + q - step] : (scalar_t)0;
        }
    }
}

// The four-way merge: out[i] = max over d < D of h[d, i], winner[i] = the first d that attains it
// (D <= 127; the order of the directions is the order of h's slices: left_to_right, right_to_left,
// top_to_bottom, bottom_to_top in the four-way layer). A NaN wins, as in maxpool.cu.
extern "C" __global__ void max_merge_forward(const scalar_t* __restrict__ h, scalar_t* __restrict__ out,
                                             signed char* __restrict__ winner, int D, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    scalar_t best = h[i];
    int best_d = 0;
    for (int d = 1; d < D; ++d) {
        const scalar_t value = h[(long long)d * n + i];
        if (value > best || (value != value && best == best)) {
            best = value;
            best_d = d;
        }
    }
    out[i] = best;
    winner[i] = (signed char)best_d;
}

// Its backward: the whole gradient goes to the winning direction, zero to the others.
extern "C" __global__ void max_merge_backward(const scalar_t* __restrict__ dout,
                                              const signed char* __restrict__ winner,
                                              scalar_t* __restrict__ dh, int D, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int best_d = winner[i];
    for (int d = 0; d < D; ++d) {
        dh[(long long)d * n + i] = d == best_d ? dout[i] : (scalar_t)0;
    }
}
