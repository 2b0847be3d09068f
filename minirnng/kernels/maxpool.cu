// Max pooling, k x k windows with stride s, no padding, PyTorch's floor mode:
//   x (N, C, H, W) -> y (N, C, Ho, Wo), Ho = (H - k) / s + 1, Wo = (W - k) / s + 1,
//   y[n, c, oy, ox] = max over i, j < k of x[n, c, oy*s + i, ox*s + j].
// The forward also records, for the backward, which window entry won: argmax (N, C, Ho, Wo) as
// int8 (signed char), the flat offset i*k + j within the window, so k*k must be at most 127.
// Ties go to the first maximum in row-major window order (i, then j), as numpy.argmax does, and a
// NaN wins over every number (the first NaN, again as numpy.argmax), so a NaN shows in the output.
//
// The backward routes dy to the winners. It is a *gather*: one thread per element of x visits the
// windows that contain it (at most ceil(k/s)^2) and sums dy over those whose argmax points at it.
// No atomics, the same bits on every run, and pixels outside every window get exactly 0.
//
// Launch: forward one thread per output element, grid blocks_for(N*C*Ho*Wo), block (256,);
//         backward one thread per input element, grid blocks_for(N*C*H*W), block (256,).

extern "C" __global__ void maxpool_forward(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                           signed char* __restrict__ argmax,
                                           int N, int C, int H, int W, int k, int s, int Ho, int Wo) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= (long long)N * C * Ho * Wo) return;
    const int index = (int)thread;
    const int ox = index % Wo;
    const int oy = (index / Wo) % Ho;
    const int plane = index / (Wo * Ho);  // n * C + c

    const scalar_t* window = x + ((long long)plane * H + oy * s) * W + ox * s;
    scalar_t best = window[0];
    int best_at = 0;
    for (int i = 0; i < k; ++i) {
        for (int j = 0; j < k; ++j) {
            const scalar_t value = window[i * W + j];
            // Strictly greater keeps the first of equal maxima; "value is NaN and best is not"
            // lets the first NaN win and stay (NaN compares false with everything).
            if (value > best || (value != value && best == best)) {
                best = value;
                best_at = i * k + j;
            }
        }
    }
    y[index] = best;
    argmax[index] = (signed char)best_at;
}

extern "C" __global__ void maxpool_backward(const scalar_t* __restrict__ dy,
                                            const signed char* __restrict__ argmax,
                                            scalar_t* __restrict__ dx,
                                            int N, int C, int H, int W, int k, int s, int Ho, int Wo) {
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (thread >= (long long)N * C * H * W) return;
    const int index = (int)thread;
    const int xx = index % W;
    const int y = (index / W) % H;
    const int plane = index / (W * H);

    // Windows containing row y: oy*s <= y < oy*s + k, i.e. ceil((y - k + 1) / s) <= oy <= y / s.
    // Starting from y / s and walking down, i = y - oy*s grows by s each step; stop when i >= k.
    scalar_t sum = 0;
    for (int oy = min(y / s, Ho - 1); oy >= 0 && y - oy * s < k; --oy) {
        const int i = y - oy * s;
        for (int ox = min(xx / s, Wo - 1); ox >= 0 && xx - ox * s < k; --ox) {
            const int j = xx - ox * s;
            const int out = (plane * Ho + oy) * Wo + ox;
            if (argmax[out] == i * k + j) sum += dy[out];
        }
    }
    dx[index] = sum;
}
