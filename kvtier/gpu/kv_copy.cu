// kvtier span copies on the GPU: one launch moves a whole batch of KV pages.
//
// Every device <-> host transfer is reduced (kvtier/layout.py) to spans of
// (source, destination, bytes).  The host side cuts long spans into chunks of
// at most a few tens of KiB and uploads one table of chunks:
//
//     table[0 .. n)      source addresses
//     table[n .. 2n)     destination addresses
//     table[2n .. 3n)    lengths in bytes
//
// Addresses may point at device memory (engine KV tensors, an HBM pool, a
// device staging buffer) or at pinned host memory mapped into the device's
// address space (unified addressing: the host pointer is the device pointer).
// Each thread block walks chunks blockIdx.x, blockIdx.x + gridDim.x, ...; all
// of its threads copy one chunk together with the widest access that the
// chunk's alignment allows (16 bytes for KV pages), several loads in flight
// per thread so that reads across PCIe overlap their latency.  Streaming cache
// hints keep copied pages from evicting the model's working set from L2.
//
// Compiled at run time through NVRTC (kvtier/gpu/cuda_copy.py) and, in CI, with nvcc
// for sm_90: no header beyond the compiler's built-ins may be included.

typedef unsigned long long kv_u64;

#define KVTIER_UNROLL 4

template <typename V>
__device__ __forceinline__ void kvtier_copy_run(const char* __restrict__ src,
                                                char* __restrict__ dst,
                                                kv_u64 nbytes) {
    const V* s = reinterpret_cast<const V*>(src);
    V* d = reinterpret_cast<V*>(dst);
    const kv_u64 count = nbytes / sizeof(V);
    const kv_u64 step = blockDim.x;
    kv_u64 i = threadIdx.x;
    // main body: UNROLL independent loads per thread before any store
    for (; i + (KVTIER_UNROLL - 1) * step < count; i += KVTIER_UNROLL * step) {
        V r[KVTIER_UNROLL];
#pragma unroll
        for (int u = 0; u < KVTIER_UNROLL; ++u) r[u] = __ldcs(s + i + u * step);
#pragma unroll
        for (int u = 0; u < KVTIER_UNROLL; ++u) __stcs(d + i + u * step, r[u]);
    }
    for (; i < count; i += step) __stcs(d + i, __ldcs(s + i));
}

// Copy every chunk of the table.  n: number of chunks.
extern "C" __global__ void kvtier_copy_chunks(const kv_u64* __restrict__ table, kv_u64 n) {
    for (kv_u64 c = blockIdx.x; c < n; c += gridDim.x) {
        const char* src = reinterpret_cast<const char*>(table[c]);
        char* dst = reinterpret_cast<char*>(table[n + c]);
        const kv_u64 len = table[2 * n + c];
        const kv_u64 align = table[c] | table[n + c] | len;
        if ((align & 15) == 0) {
            kvtier_copy_run<uint4>(src, dst, len);
        } else if ((align & 7) == 0) {
            kvtier_copy_run<uint2>(src, dst, len);
        } else if ((align & 3) == 0) {
            kvtier_copy_run<unsigned int>(src, dst, len);
        } else {
            kvtier_copy_run<unsigned char>(src, dst, len);
        }
    }
}

// Fill bytes with a value (destination poisoning in tests and benchmarks,
// without a host round trip).  Same table layout; the source column is unused.
extern "C" __global__ void kvtier_fill_chunks(const kv_u64* __restrict__ table, kv_u64 n,
                                              unsigned int byte) {
    for (kv_u64 c = blockIdx.x; c < n; c += gridDim.x) {
        unsigned char* dst = reinterpret_cast<unsigned char*>(table[n + c]);
        const kv_u64 len = table[2 * n + c];
        for (kv_u64 i = threadIdx.x; i < len; i += blockDim.x) dst[i] = (unsigned char)byte;
    }
}
