// Soft Dice loss of a softmax over K classes: a differentiable F-measure per class, averaged.
//
//   logits  (N, K, H, W) scalar_t       targets (N, H, W) int64 (long long)
//   mask    (N, H, W) uint8 or bool, or a null pointer (None): pixels where it is 0 do not count
//   ignore_index: pixels whose target equals it do not count (-100 when there is nothing to ignore)
// With p = softmax(logits), y = onehot(target) and u = 1 for the pixels that count, 0 otherwise,
//   I_k = sum_i u_i p_ik y_ik          (the soft intersection of class k)
//   S_k = sum_i u_i (p_ik + y_ik)      (the soft sizes of prediction and truth together)
//   D_k = (2 I_k + s) / (S_k + s),     loss = 1 - (1/K) sum_k D_k
// where s > 0 (smooth) keeps D_k = 1 for a class absent from both.
//
// Forward, in two steps (a reduction needs a second pass without shared memory):
//   1. soft_dice_forward writes terms (2K, N*H*W): row k the pixel's u p_k y_k, row K + k its
//      u (p_k + y_k).  Launch: one thread per pixel, grid blocks_for(N*H*W), block (256,).
//   2. channel_sum (reduce.cu) of terms viewed as (1, 2K, N*H*W) gives totals (2K,) =
//      [I_0 .. I_{K-1}, S_0 .. S_{K-1}]; the loss is computed from them on the host.
// Backward: soft_dice_backward reads totals on the device and writes, for a pixel that counts,
//   g_k = dloss/dp_k = -(scale / K) (2 y_k - D_k) / (S_k + s)
//   dlogits_k = p_k (g_k - sum_j p_j g_j) = p_k sum_{j != k} p_j (g_k - g_j)
// and 0 for the others. The second form of the softmax's chain rule has no cancellation: for a
// confident pixel (p_t within a float32 step of 1) the first would subtract two nearly equal
// numbers and keep only their rounding. K is small (3 for LFW-PL, 11 for HELEN), so the K^2 terms
// cost less than reading the logits. Launch: one thread per pixel, grid blocks_for(N*H*W), block (256,).
//
// Each thread owns one pixel and loops over its K classes, which are H*W apart in memory; threads
// next to each other take pixels next to each other, so every read is coalesced. A target outside
// [0, K) that counts makes that pixel's terms and gradient NaN, so the mistake shows instead of
// reading memory outside the logits (as in softmax_cross_entropy.cu).

#include "softmax.cuh"

extern "C" __global__ void soft_dice_forward(const scalar_t* __restrict__ logits,
                                             const long long* __restrict__ targets,
                                             const unsigned char* __restrict__ mask,
                                             scalar_t* __restrict__ terms,
                                             int N, int K, int P, int ignore_index) {
    const long long pixel = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long pixels = (long long)N * P;
    if (pixel >= pixels) return;
    const scalar_t* z = logits + class_scores_offset(pixel, K, P);   // class k at z[k * P]

    const long long label = targets[pixel];
    const bool counted = label != ignore_index && (mask == nullptr || mask[pixel] != 0);
    if (!counted) {
        for (int k = 0; k < 2 * K; ++k) terms[k * pixels + pixel] = 0;
        return;
    }
    const bool label_ok = label >= 0 && label < K;
    scalar_t m;
    const scalar_t sum = sum_exp_shifted(z, K, P, &m);
    for (int k = 0; k < K; ++k) {
        const scalar_t p = exp(z[(long long)k * P] - m) / sum;
        const scalar_t y = !label_ok ? (scalar_t)nan("") : (k == label ? (scalar_t)1 : (scalar_t)0);
        terms[k * pixels + pixel] = p * y;
        terms[(K + k) * pixels + pixel] = p + y;
    }
}

// g_k = dloss/dp_k of a pixel whose target is `label`, from the totals: D_k = (2 I_k + s) / (S_k + s)
// and dD_k/dp_k = (2 y_k - D_k) / (S_k + s), so no square of a large sum is ever formed.
__device__ __forceinline__ scalar_t dice_slope(const scalar_t* totals, scalar_t smooth, scalar_t scale,
                                               int K, int k, long long label) {
    const scalar_t size = totals[K + k] + smooth;
    const scalar_t dice = ((scalar_t)2 * totals[k] + smooth) / size;
    const scalar_t y = k == label ? (scalar_t)1 : (scalar_t)0;
    return -(scale / K) * ((scalar_t)2 * y - dice) / size;
}

extern "C" __global__ void soft_dice_backward(const scalar_t* __restrict__ logits,
                                              const long long* __restrict__ targets,
                                              const unsigned char* __restrict__ mask,
                                              const scalar_t* __restrict__ totals,
                                              scalar_t smooth, scalar_t scale,
                                              scalar_t* __restrict__ dlogits,
                                              int N, int K, int P, int ignore_index) {
    const long long pixel = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (pixel >= (long long)N * P) return;
    const long long offset = class_scores_offset(pixel, K, P);
    const scalar_t* z = logits + offset;
    scalar_t* dz = dlogits + offset;

    const long long label = targets[pixel];
    const bool counted = label != ignore_index && (mask == nullptr || mask[pixel] != 0);
    if (!counted) {
        for (int k = 0; k < K; ++k) dz[(long long)k * P] = 0;
        return;
    }
    if (label < 0 || label >= K) {
        for (int k = 0; k < K; ++k) dz[(long long)k * P] = (scalar_t)nan("");
        return;
    }
    scalar_t m;
    const scalar_t sum = sum_exp_shifted(z, K, P, &m);
    for (int k = 0; k < K; ++k) {
        scalar_t pairs = 0;  // sum_{j != k} p_j (g_k - g_j)
        for (int j = 0; j < K; ++j) {
            if (j == k) continue;
            pairs += exp(z[(long long)j * P] - m) / sum * (dice_slope(totals, smooth, scale, K, k, label)
                                                           - dice_slope(totals, smooth, scale, K, j, label));
        }
        dz[(long long)k * P] = exp(z[(long long)k * P] - m) / sum * pairs;
    }
}
