// strided_taps.cuh: which taps of a strided window reach a given position along one axis.
//
// Shared by col2im (im2col.cu) and the transposed convolution's gather (conv_direct.cu), which ask
// the same question: windows of k taps are laid at stride s along an axis padded by p, window w
// starting at w*s - p, so tap i of window w covers position y exactly when y = w*s - p + i.
// For a position y, with yp = y + p, the taps that reach it are
//
//     i = yp mod s, yp mod s + s, yp mod s + 2s, ...   (while i < k)
//
// and tap i comes from window w = (yp - i) / s, one window lower at each step. Only the windows
// 0 <= w < windows exist: the first taps may point past the last window (skip them), and the walk
// stops before window -1. Both callers sum their terms in this order (tap ascending), so they give
// the same bits as a loop over every tap with bounds checks.
//
// Included by sources that need it with #include "strided_taps.cuh"; minirnng.cuda.sources pastes
// the header into the source text, so both compilers (NVRTC and the emulator's) see one unit, and
// editing the header recompiles everything that includes it.

#ifndef MINIRNNG_STRIDED_TAPS_CUH
#define MINIRNNG_STRIDED_TAPS_CUH

struct StridedTaps {
    int first_tap;     // the smallest tap i that reaches the position from an existing window
    int first_window;  // the window it belongs to; tap first_tap + t*s belongs to first_window - t
    int count;         // how many taps reach it (0 when none does)
};

__device__ __forceinline__ StridedTaps strided_taps(int yp, int k, int s, int windows) {
    const int remainder = yp % s;
    const int top_window = yp / s;                 // the window of tap `remainder`
    int skipped = top_window - (windows - 1);      // taps whose window is past the last one
    if (skipped < 0) skipped = 0;
    int end = (k - remainder + s - 1) / s;         // taps remainder, remainder + s, ... below k
    if (end > top_window + 1) end = top_window + 1;  // and whose window is not below 0
    StridedTaps taps;
    taps.first_tap = remainder + skipped * s;
    taps.first_window = top_window - skipped;
    taps.count = end > skipped ? end - skipped : 0;
    return taps;
}

#endif
