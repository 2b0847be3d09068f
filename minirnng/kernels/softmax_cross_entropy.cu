// Softmax cross-entropy over the classes of every pixel, with PyTorch's weighted-mean reduction.
//
//   logits (N, K, H, W) scalar_t       targets (N, H, W) int64 (long long)
//   mask   (N, H, W) uint8 or bool, or a null pointer (None): pixels where it is 0 do not count
//   class_weights (K,) scalar_t, or a null pointer: every class weighs 1
//   ignore_index: pixels whose target equals it do not count (pass -100, PyTorch's default,
//                 when there is nothing to ignore: no label is negative)
// A pixel's weight is w = class_weights[target] (or 1), and 0 when it is masked out or ignored.
//   loss  = sum over pixels of w * (logsumexp_k(logits) - logits[target])  /  sum over pixels of w
//
// Forward, in two steps, because a reduction needs a second pass without shared memory:
//   1. softmax_cross_entropy_forward writes terms (2, N*H*W): row 0 the weighted loss of every
//      pixel, row 1 its weight.  Launch: one thread per pixel, grid blocks_for(N*H*W), block (256,).
//   2. channel_sum (reduce.cu) of terms viewed as (1, 2, N*H*W) gives totals (2,):
//      [sum of weighted losses, sum of weights]; the loss is their ratio (0/0 = NaN when no pixel
//      counts, as in PyTorch).
// Backward: softmax_cross_entropy_backward reads totals on the device (no copy to the host) and
//   writes dlogits = scale * w * (softmax(logits) - onehot(target)) / totals[1], where scale is
//   the upstream gradient of the loss (1 for a loss that is minimised directly). Pixels of weight 0
//   get exactly 0. Launch: one thread per pixel, grid blocks_for(N*H*W), block (256,).
//
// Each thread owns one pixel and loops over its K classes, which are H*W apart in memory; threads
// next to each other take pixels next to each other, so every read is coalesced.
// The log-sum-exp subtracts the largest logit first, so exp never overflows, and the target's
// gradient avoids the cancellation in softmax - 1 (see the backward).
// A target outside [0, K) that is neither ignored nor masked out cannot raise an error on a GPU:
// it makes that pixel's loss and gradient NaN, so the mistake shows instead of reading memory
// outside the logits.

#include "softmax.cuh"

// The weight of one pixel (0 if it does not count). *label_ok tells whether its target is a class.
__device__ __forceinline__ scalar_t pixel_weight(long long label, const unsigned char* mask,
                                                 const scalar_t* class_weights, long long pixel,
                                                 int K, int ignore_index, bool* label_ok) {
    *label_ok = label >= 0 && label < K;
    if (label == ignore_index) return 0;
    if (mask != nullptr && mask[pixel] == 0) return 0;
    if (class_weights != nullptr && *label_ok) return class_weights[label];
    return 1;
}

extern "C" __global__ void softmax_cross_entropy_forward(const scalar_t* __restrict__ logits,
                                                         const long long* __restrict__ targets,
                                                         const unsigned char* __restrict__ mask,
                                                         const scalar_t* __restrict__ class_weights,
                                                         scalar_t* __restrict__ terms,
                                                         int N, int K, int P, int ignore_index) {
    const long long pixel = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long pixels = (long long)N * P;
    if (pixel >= pixels) return;
    const scalar_t* z = logits + class_scores_offset(pixel, K, P);   // class k at z[k * P]

    const long long label = targets[pixel];
    bool label_ok;
    const scalar_t w = pixel_weight(label, mask, class_weights, pixel, K, ignore_index, &label_ok);
    scalar_t loss = 0;
    if (w != 0 && !label_ok) {
        loss = (scalar_t)nan("");
    } else if (w != 0) {
        // logsumexp(z) - z[label] = log(sum) + (m - z[label]): no large number is subtracted from another.
        scalar_t m;
        const scalar_t sum = sum_exp_shifted(z, K, P, &m);
        loss = log(sum) + (m - z[label * P]);
    }
    terms[pixel] = w * loss;
    terms[pixels + pixel] = w;
}

extern "C" __global__ void softmax_cross_entropy_backward(const scalar_t* __restrict__ logits,
                                                          const long long* __restrict__ targets,
                                                          const unsigned char* __restrict__ mask,
                                                          const scalar_t* __restrict__ class_weights,
                                                          const scalar_t* __restrict__ totals,
                                                          scalar_t scale,
                                                          scalar_t* __restrict__ dlogits,
                                                          int N, int K, int P, int ignore_index) {
    const long long pixel = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (pixel >= (long long)N * P) return;
    const long long offset = class_scores_offset(pixel, K, P);
    const scalar_t* z = logits + offset;
    scalar_t* dz = dlogits + offset;

    const long long label = targets[pixel];
    bool label_ok;
    const scalar_t w = pixel_weight(label, mask, class_weights, pixel, K, ignore_index, &label_ok);
    if (w == 0) {
        for (int k = 0; k < K; ++k) dz[(long long)k * P] = 0;
        return;
    }
    if (!label_ok) {
        for (int k = 0; k < K; ++k) dz[(long long)k * P] = (scalar_t)nan("");
        return;
    }
    scalar_t m;
    const scalar_t sum = sum_exp_shifted(z, K, P, &m);
    const scalar_t coefficient = scale * w / totals[1];
    // softmax_k - onehot_k. For the target class, softmax - 1 is computed as minus the sum of the
    // other classes' probabilities: when the pixel is classified confidently, softmax rounds to
    // nearly 1 and "softmax - 1" would keep only the rounding error (in float32, all of it).
    scalar_t others = 0;
    for (int k = 0; k < K; ++k) {
        if (k == label) continue;
        const scalar_t e = exp(z[(long long)k * P] - m);
        others += e;
        dz[(long long)k * P] = coefficient * (e / sum);
    }
    dz[label * P] = -coefficient * (others / sum);
}
