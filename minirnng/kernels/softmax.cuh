// softmax.cuh: a pixel's class scores and the shifted exponentials of its softmax, for the losses
// on class scores.
//
// Shared by softmax_cross_entropy.cu and soft_dice.cu, which both need, for a pixel whose K class
// scores lie P apart in memory (z[k * P], as in an (N, K, H, W) array),
//
//     m = max_k z_k   and   sum = sum_k exp(z_k - m),   so that softmax_k = exp(z_k - m) / sum.
//
// Subtracting the largest score first keeps exp from overflowing (scores of 1e4 are fine), and
// the losses need only differences to it.
//
// Included with #include "softmax.cuh"; minirnng.cuda.sources pastes the header into the source
// text, so both compilers (NVRTC and the emulator's) see one unit.

#ifndef MINIRNNG_SOFTMAX_CUH
#define MINIRNNG_SOFTMAX_CUH

// Where the K scores of a pixel start in an (N, K, H, W) array with P = H*W: pixel = n*P + q
// (image n, position q) has class k at offset + k*P.
__device__ __forceinline__ long long class_scores_offset(long long pixel, int K, int P) {
    const long long n = pixel / P, q = pixel % P;
    return n * K * P + q;
}

// sum_k exp(z[k*P] - m) with m = max_k z[k*P] (returned in *largest).
__device__ __forceinline__ scalar_t sum_exp_shifted(const scalar_t* z, int K, int P, scalar_t* largest) {
    scalar_t m = z[0];
    for (int k = 1; k < K; ++k) m = fmax(m, z[(long long)k * P]);
    scalar_t sum = 0;
    for (int k = 0; k < K; ++k) sum += exp(z[(long long)k * P] - m);
    *largest = m;
    return sum;
}

#endif
