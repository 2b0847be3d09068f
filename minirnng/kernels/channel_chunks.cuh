// channel_chunks.cuh: which elements a thread of a per-channel reduction visits.
//
// A sum per channel over an (N, C, P) array takes two passes (reduce.cu says why). In the first,
// thread (c, chunk), for chunk in [0, chunks), visits the elements m = chunk, chunk + chunks,
// chunk + 2*chunks, ... of channel c's count = N*P, element m being x[m / P, c, m % P]. Threads
// next to each other take elements next to each other, so their reads are coalesced.
//
// Shared by reduce.cu (channel_sum_partial) and batch_norm.cu (the centred squares and the
// gradient sums), which differ only in what they add up. Included with #include "channel_chunks.cuh".

#ifndef MINIRNNG_CHANNEL_CHUNKS_CUH
#define MINIRNNG_CHANNEL_CHUNKS_CUH

struct ChannelChunk {
    int c;            // the channel this thread sums
    int chunk;        // its first element; it then steps by chunks
    long long count;  // N*P, the elements of a channel
};

// The part of thread = c*chunks + chunk (launched for C*chunks threads).
__device__ __forceinline__ ChannelChunk channel_chunk(long long thread, int N, int P, int chunks) {
    ChannelChunk at;
    at.chunk = (int)(thread % chunks);
    at.c = (int)(thread / chunks);
    at.count = (long long)N * P;
    return at;
}

// Where element m of channel c lies in an (N, C, P) array.
__device__ __forceinline__ long long channel_element(long long m, int c, int C, int P) {
    return ((m / P) * C + c) * P + m % P;
}

#endif
