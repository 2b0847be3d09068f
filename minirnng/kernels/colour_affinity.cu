// Colour affinity: a CRF's pairwise term on the softmax of the logits, over 8-connected neighbours.
//
//   logits (N, K, H, W) scalar_t       images (N, C, H, W) scalar_t (the network's input)
// With p = softmax over the K classes, for every pair of 8-connected pixels (i, j) of an image,
//   w_ij = s_d exp(-|I_i - I_j|^2 * colour_scale)   (s_d = straight for a step of 1 pixel,
//                                                     diagonal for a step of sqrt 2; colour_scale = 1 / (2 s_rgb^2))
//   loss = 1/(N H W) sum_{(i, j)} w_ij (1 - p_i . p_j)
//   dloss/dp_i = -1/(N H W) sum_{j ~ i} w_ij p_j,    dloss/dz_i = p_i (g_i - p_i . g_i),  g = dloss/dp
// (minirnng.losses.ColourAffinity, whose NumPy path computes the same formulas).
//
// Forward: colour_affinity_forward writes terms (N*H*W,): for pixel i, the sum over its four
//   neighbours after it (right, below, below-right, below-left; each pair once) of w (1 - p_i . p_j),
//   0 for a neighbour outside the image. channel_sum (reduce.cu) adds them up.
//   Launch: one thread per pixel, grid blocks_for(N*H*W), block (256,).
// Backward: colour_affinity_backward writes dlogits for pixel i from all eight neighbours, with
//   scale = grad_output / (N H W). Launch: one thread per pixel, grid blocks_for(N*H*W), block (256,).
//
// A thread recomputes the softmax of each neighbour it reads (K is small: 3 for LFW-PL, 11 for
// HELEN); threads next to each other take pixels next to each other, so the reads are coalesced.

#include "softmax.cuh"

// The weight of the pair (pixel, neighbour) of image n: the spatial weight times the Gaussian of
// their colour difference over the C channels (P = H*W apart).
__device__ __forceinline__ scalar_t pair_weight(const scalar_t* image, long long q, long long r, int C, int P,
                                                scalar_t spatial, scalar_t colour_scale) {
    scalar_t distance = 0;
    for (int c = 0; c < C; ++c) {
        const scalar_t d = image[(long long)c * P + q] - image[(long long)c * P + r];
        distance += d * d;
    }
    return spatial * exp(-distance * colour_scale);
}

// Where a pixel (an index into N*H*W) lies: its image n, and its place q = y*W + x in that image.
struct PixelPlace {
    long long n;
    int q, y, x;
};

__device__ __forceinline__ PixelPlace place_of(long long pixel, int H, int W) {
    PixelPlace at;
    at.n = pixel / ((long long)H * W);
    at.q = (int)(pixel % ((long long)H * W));
    at.y = at.q / W;
    at.x = at.q % W;
    return at;
}

// p_i . p_j for two pixels of one image, from their scores (z_i and z_j: class k at k*P).
__device__ __forceinline__ scalar_t softmax_dot(const scalar_t* zi, const scalar_t* zj, int K, int P) {
    scalar_t mi, mj;
    const scalar_t si = sum_exp_shifted(zi, K, P, &mi);
    const scalar_t sj = sum_exp_shifted(zj, K, P, &mj);
    scalar_t dot = 0;
    for (int k = 0; k < K; ++k)
        dot += exp(zi[(long long)k * P] - mi) * exp(zj[(long long)k * P] - mj);
    return dot / (si * sj);
}

extern "C" __global__ void colour_affinity_forward(const scalar_t* __restrict__ logits,
                                                   const scalar_t* __restrict__ images,
                                                   scalar_t* __restrict__ terms,
                                                   scalar_t straight, scalar_t diagonal, scalar_t colour_scale,
                                                   int N, int K, int C, int H, int W) {
    const long long pixel = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int P = H * W;
    if (pixel >= (long long)N * P) return;
    const PixelPlace at = place_of(pixel, H, W);
    const int q = at.q, y = at.y, x = at.x;
    const scalar_t* z = logits + at.n * K * P;
    const scalar_t* image = images + at.n * C * P;

    // the four neighbours after this pixel: (0, 1), (1, 0), (1, 1), (1, -1)
    const int dys[4] = {0, 1, 1, 1}, dxs[4] = {1, 0, 1, -1};
    scalar_t term = 0;
    for (int d = 0; d < 4; ++d) {
        const int ny = y + dys[d], nx = x + dxs[d];
        if (ny >= H || nx < 0 || nx >= W) continue;
        const int r = ny * W + nx;
        const scalar_t weight = pair_weight(image, q, r, C, P, dys[d] && dxs[d] ? diagonal : straight, colour_scale);
        term += weight * ((scalar_t)1 - softmax_dot(z + q, z + r, K, P));
    }
    terms[pixel] = term;
}

extern "C" __global__ void colour_affinity_backward(const scalar_t* __restrict__ logits,
                                                    const scalar_t* __restrict__ images,
                                                    scalar_t* __restrict__ dlogits,
                                                    scalar_t straight, scalar_t diagonal, scalar_t colour_scale,
                                                    scalar_t scale, int N, int K, int C, int H, int W) {
    const long long pixel = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (pixel >= (long long)N * H * W) return;
    const int P = H * W;
    const PixelPlace at = place_of(pixel, H, W);
    const int q = at.q, y = at.y, x = at.x;
    const scalar_t* z = logits + at.n * K * P;       // this image's scores and colours
    const scalar_t* image = images + at.n * C * P;
    scalar_t* dz = dlogits + at.n * K * P + q;        // this pixel's gradient, class k at dz[k * P]

    scalar_t mi;
    const scalar_t si = sum_exp_shifted(z + q, K, P, &mi);
    // g_k = -scale sum_j w_ij p_jk over all eight neighbours, then p_k (g_k - p . g), class by
    // class in dz (K is at most a few dozen, so no per-thread array is needed)
    for (int k = 0; k < K; ++k) dz[(long long)k * P] = 0;
    for (int dy = -1; dy <= 1; ++dy) {
        for (int dx = -1; dx <= 1; ++dx) {
            const int ny = y + dy, nx = x + dx;
            if ((dy == 0 && dx == 0) || ny < 0 || ny >= H || nx < 0 || nx >= W) continue;
            const int r = ny * W + nx;
            const scalar_t weight = pair_weight(image, q, r, C, P, dy && dx ? diagonal : straight, colour_scale);
            scalar_t mj;
            const scalar_t sj = sum_exp_shifted(z + r, K, P, &mj);
            for (int k = 0; k < K; ++k)
                dz[(long long)k * P] -= scale * weight * exp(z[(long long)k * P + r] - mj) / sj;
        }
    }
    scalar_t dot = 0;  // p . g
    for (int k = 0; k < K; ++k) dot += exp(z[(long long)k * P + q] - mi) / si * dz[(long long)k * P];
    for (int k = 0; k < K; ++k) {
        const scalar_t g = dz[(long long)k * P];
        dz[(long long)k * P] = exp(z[(long long)k * P + q] - mi) / si * (g - dot);
    }
}
