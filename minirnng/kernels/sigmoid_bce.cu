// Binary cross-entropy on logits (sigmoid inside), averaged over the pixels that count.
//
//   logits  (N, 1, H, W) scalar_t, seen as n = N*H*W values z
//   targets (N, 1, H, W) scalar_t in {0, 1} (any value in [0, 1] works: the formula is the same)
//   mask    (N, H, W) uint8 or bool, or a null pointer (None): pixels where it is 0 do not count
//           (the edge loss samples its pixels this way)
//   loss = sum over counted pixels of bce(z, t)  /  number of counted pixels
//   bce(z, t) = -t log sigmoid(z) - (1 - t) log(1 - sigmoid(z)) = max(z, 0) - z t + log(1 + e^-|z|)
// The last form never exponentiates a positive number, so it is finite for logits of any size
// and sign (the naive form gives log(0) = -inf once sigmoid(z) rounds to 0 or 1).
//
// Two steps, as for softmax_cross_entropy.cu:
//   1. sigmoid_bce_forward writes terms (2, n): row 0 each pixel's loss times its weight (0 or 1),
//      row 1 the weight.  Launch: one thread per pixel, grid blocks_for(n), block (256,).
//   2. channel_sum (reduce.cu) of terms viewed as (1, 2, n) gives totals (2,); loss = ratio.
// Backward: dlogits = scale * w * (sigmoid(z) - t) / totals[1], 0 where w = 0.
//   Launch: one thread per pixel, grid blocks_for(n), block (256,).

extern "C" __global__ void sigmoid_bce_forward(const scalar_t* __restrict__ logits,
                                               const scalar_t* __restrict__ targets,
                                               const unsigned char* __restrict__ mask,
                                               scalar_t* __restrict__ terms, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const bool counted = mask == nullptr || mask[i] != 0;
    scalar_t loss = 0;
    if (counted) {
        const scalar_t z = logits[i];
        loss = fmax(z, (scalar_t)0) - z * targets[i] + log1p(exp(-fabs(z)));
    }
    terms[i] = loss;
    terms[n + i] = counted ? (scalar_t)1 : (scalar_t)0;
}

extern "C" __global__ void sigmoid_bce_backward(const scalar_t* __restrict__ logits,
                                                const scalar_t* __restrict__ targets,
                                                const unsigned char* __restrict__ mask,
                                                const scalar_t* __restrict__ totals,
                                                scalar_t scale,
                                                scalar_t* __restrict__ dlogits, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (mask != nullptr && mask[i] == 0) {
        dlogits[i] = 0;
        return;
    }
    const scalar_t z = logits[i];
    const scalar_t t = targets[i];
    // sigmoid(z) - t from e = e^-|z|, which cannot overflow: for z >= 0, sigmoid = 1 - e/(1+e), so
    // sigmoid - t = (1 - t) - e/(1+e); for z < 0, sigmoid = e/(1+e). Written this way, a confident
    // right answer (z >> 0, t = 1) gives the tiny -e/(1+e) exactly rather than 1 - 1 rounded.
    const scalar_t e = exp(-fabs(z));
    const scalar_t difference = z >= 0 ? ((scalar_t)1 - t) - e / ((scalar_t)1 + e) : e / ((scalar_t)1 + e) - t;
    dlogits[i] = scale * difference / totals[1];
}
