// Adding a per-channel bias to (N, C, P) in place: y[n, c, q] += b[c].
//
// Used after the matrix product of Conv2d and ConvTranspose2d (P = Ho*Wo). The bias *gradient*,
// db[c] = sum over n and q of dy[n, c, q], is a reduction: it is the kernel channel_sum in
// reduce.cu, shared with the losses and the recurrent layers, which need the same sum.
//
// Launch: one thread per element of y, grid blocks_for(N*C*P), block (256,).

extern "C" __global__ void bias_add(scalar_t* __restrict__ y, const scalar_t* __restrict__ b,
                                    int N, int C, int P) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= (long long)N * C * P) return;
    const int index = (int)thread;
    const int c = (index / P) % C;
    y[index] += b[c];
}
