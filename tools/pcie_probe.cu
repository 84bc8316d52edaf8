// tools/pcie_probe.cu: how fast the GPU can read host memory, the measurements behind
// docs/performance.md's table "How the GPU can read host memory" (a tool outside the engine,
// written with the CUDA runtime for brevity). On a GPU machine:
//
//   nvcc -O2 -std=c++17 -arch=sm_90a -rdc=true -o pcie_probe tools/pcie_probe.cu -lcudadevrt -lcuda
//   ./pcie_probe            (everything below but the large region)
//   ./pcie_probe large 48   (SM scaling and a 48 GiB region: see large_region)
//   ./pcie_probe gemv 76    (the GEMV's access pattern in a 76 GiB region: see gemv_pattern)
//   ./pcie_probe stream 12  (experts copied by a host thread's copy engine: see stream_experiment)
//
// It reads 2 GiB of page-locked, mapped host memory (and, for reference, of device memory) with
// SM loads (ld_stride, ld_warp_span), per-thread asynchronous copies (cpasync_ring) and
// cp.async.bulk rings (bulk_ring: the GEMV's way), by blocks per SM, loads or stages in flight
// and chunk size; then ordinary memory in huge pages and a file's mmapped pages, each registered
// read-only in place; the copy engine; and a graph of switch nodes (43 layers x 6 slots, 140
// host-to-device copies each) whose values a kernel sets (cudaGraphSetConditional): the copy
// engine driven from the GPU. Every time is the median of 3 runs after a warm-up.
#include <cuda.h>
#include <cuda_runtime.h>
#include <thread>
#include <immintrin.h>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <functional>
#include <sys/mman.h>
#include <cstring>
#include <cstdlib>
#include <fcntl.h>
#include <unistd.h>
#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); exit(1); } } while (0)

__device__ __forceinline__ unsigned sm(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }

// grid-stride 16-byte loads, U in flight per thread
template <int U> __global__ void ld_stride(const uint4 *buf, size_t n16, unsigned *out) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    unsigned s = 0;
    for (; i + (U - 1) * stride < n16; i += U * stride) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; u++) v[u] = __ldg(buf + i + u * stride);
#pragma unroll
        for (int u = 0; u < U; u++) s += v[u].x + v[u].y + v[u].z + v[u].w;
    }
    atomicAdd(out, s);
}
// each warp a contiguous span of span16 vectors, U loads in flight a lane
template <int U> __global__ void ld_warp_span(const uint4 *buf, size_t n16, size_t span16, unsigned *out) {
    size_t warp = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32, nwarps = (size_t)gridDim.x * blockDim.x / 32;
    unsigned lane = threadIdx.x % 32, s = 0;
    for (size_t base = warp * span16; base < n16; base += nwarps * span16)
        for (size_t j = lane; j + 32 * (U - 1) < span16; j += 32 * U) {
            uint4 v[U];
#pragma unroll
            for (int u = 0; u < U; u++) v[u] = __ldg(buf + base + j + 32 * u);
#pragma unroll
            for (int u = 0; u < U; u++) s += v[u].x + v[u].y + v[u].z + v[u].w;
        }
    atomicAdd(out, s);
}
// cp.async.bulk ring: thread 0 of each block keeps `stages` chunks of `chunk` bytes in flight
__global__ void bulk_ring(const char *src, size_t bytes, unsigned chunk, int stages, int contiguous, unsigned *out) {
    extern __shared__ __align__(128) char ring[];
    __shared__ __align__(8) uint64_t bar[8];
    if (threadIdx.x != 0) return;
    size_t n = bytes / chunk, first, step, count;
    if (contiguous) { first = n * blockIdx.x / gridDim.x; count = n * (blockIdx.x + 1) / gridDim.x - first; step = 1; }
    else { first = blockIdx.x; step = gridDim.x; count = n > first ? (n - first + step - 1) / step : 0; }
    for (int s = 0; s < stages; s++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sm(&bar[s])));
    asm volatile("fence.mbarrier_init.release.cluster;");
    unsigned sum = 0;
    auto issue = [&](size_t k) {
        int s = k % stages;
        const char *p = src + (first + k * step) * chunk;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sm(&bar[s])), "r"(chunk));
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(sm(ring + (size_t)s * chunk)), "l"(p), "r"(chunk), "r"(sm(&bar[s])) : "memory");
    };
    for (size_t k = 0; k < count && k < (size_t)stages; k++) issue(k);
    for (size_t k = 0; k < count; k++) {
        int s = k % stages;
        unsigned ph = (k / stages) & 1;
        asm volatile("{ .reg .pred p; W%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1; @!p bra W%=; }" ::"r"(sm(&bar[s])), "r"(ph));
        sum += *(volatile unsigned *)(ring + (size_t)s * chunk);
        if (k + stages < count) issue(k + stages);
    }
    atomicAdd(out, sum);
}
// cp.async ring (LDGSTS: every thread copies 16 bytes at a time into shared memory, the SMs'
// load path, asynchronous): S stages of `chunk` bytes, chunks interleaved over the blocks
template <int S> __global__ void cpasync_ring(const char *src, size_t bytes, unsigned chunk, unsigned *out) {
    extern __shared__ __align__(128) char ring[];
    size_t n = bytes / chunk, first = blockIdx.x, step = gridDim.x;
    size_t count = n > first ? (n - first + step - 1) / step : 0;
    auto issue = [&](size_t k) {
        if (k < count) {
            const char *p = src + (first + k * step) * chunk;
            char *d = ring + (k % S) * chunk;
            for (unsigned o = threadIdx.x * 16; o < chunk; o += blockDim.x * 16)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sm(d + o)), "l"(p + o) : "memory");
        }
        asm volatile("cp.async.commit_group;");
    };
    for (int s = 0; s < S - 1; s++) issue(s);
    unsigned sum = 0;
    for (size_t k = 0; k < count; k++) {
        issue(k + S - 1);
        asm volatile("cp.async.wait_group %0;" ::"n"(S - 1));
        __syncthreads();
        sum += *(volatile unsigned *)(ring + (k % S) * chunk + threadIdx.x * 4);
        __syncthreads();
    }
    atomicAdd(out, sum);
}
// the GEMV's access pattern: items of `cbytes` codes (+ `sbytes` scales from elsewhere, 0: none)
// at the offsets of `items` (code offset, scale offset), item k to block k % gridDim.x, a ring of
// 4 stages a block; by the bulk engine (thread 0) or by the block's threads' 16-byte cp.async
// Where the item addresses come from (`where`): 0 the table in global memory, read as each item
// is issued; 1 the block's entries of the table copied into shared memory first; 2 no table:
// computed from the launch's 6 experts (`pick`, a kernel parameter) in the table's layout.
struct Picks { unsigned long long expert[6]; };
__global__ void gather_ring(const char *src, const ulonglong2 *items, size_t n, unsigned cbytes, unsigned sbytes,
                            int bulk, int where, Picks pick, unsigned *out) {
    extern __shared__ __align__(128) char ring[];
    __shared__ __align__(8) uint64_t bar[4];
    __shared__ ulonglong2 mine[64];
    const unsigned stage = 36864;
    size_t count = n > blockIdx.x ? (n - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    if (where == 1) {
        for (size_t k = threadIdx.x; k < count && k < 64; k += blockDim.x) mine[k] = items[blockIdx.x + k * gridDim.x];
        __syncthreads();
    }
    auto item_at = [&](size_t k) -> ulonglong2 {
        if (where == 0) return items[blockIdx.x + k * gridDim.x];
        if (where == 1) return mine[k];
        size_t i = blockIdx.x + k * gridDim.x, e = i / 256, m = i / 128 % 2, r = i % 128;
        size_t mat = (4u << 20) + (512u << 10), base = pick.expert[e] * 3 * mat + m * mat;
        return make_ulonglong2(base + r * 32768, base + (4u << 20) + r * 4096);
    };
    if (bulk) {
        if (threadIdx.x != 0) return;
        for (int s = 0; s < 4; s++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sm(&bar[s])));
        asm volatile("fence.mbarrier_init.release.cluster;");
    }
    auto issue = [&](size_t k) {
        if (k < count) {
            ulonglong2 it = item_at(k);
            char *d = ring + (k % 4) * stage;
            if (bulk) {
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sm(&bar[k % 4])), "r"(cbytes + sbytes));
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                             ::"r"(sm(d)), "l"(src + it.x), "r"(cbytes), "r"(sm(&bar[k % 4])) : "memory");
                if (sbytes)
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                                 ::"r"(sm(d + 32768)), "l"(src + it.y), "r"(sbytes), "r"(sm(&bar[k % 4])) : "memory");
            } else {
                for (unsigned o = threadIdx.x * 16; o < cbytes; o += blockDim.x * 16)
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sm(d + o)), "l"(src + it.x + o) : "memory");
                for (unsigned o = threadIdx.x * 16; o < sbytes; o += blockDim.x * 16)
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sm(d + 32768 + o)), "l"(src + it.y + o) : "memory");
            }
        }
        if (!bulk) asm volatile("cp.async.commit_group;");
    };
    unsigned sum = 0;
    if (bulk) {
        for (size_t k = 0; k < 4; k++) issue(k);
        for (size_t k = 0; k < count; k++) {
            unsigned ph = (k / 4) & 1;
            asm volatile("{ .reg .pred p; W%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1; @!p bra W%=; }" ::"r"(sm(&bar[k % 4])), "r"(ph));
            sum += *(volatile unsigned *)(ring + (k % 4) * stage);
            issue(k + 4);
        }
    } else {
        for (int s = 0; s < 3; s++) issue(s);
        for (size_t k = 0; k < count; k++) {
            issue(k + 3);
            asm volatile("cp.async.wait_group 3;");
            __syncthreads();
            sum += *(volatile unsigned *)(ring + (k % 4) * stage + threadIdx.x * 4);
            __syncthreads();
        }
    }
    atomicAdd(out, sum);
}
__global__ void set_switches(cudaGraphConditionalHandle *h, const unsigned *values, int n) {
    if (threadIdx.x < n) cudaGraphSetConditional(h[threadIdx.x], values[threadIdx.x]);
}

static float time_ms(cudaStream_t st, const std::function<void()> &f, int reps = 3) {
    std::vector<float> t;
    cudaEvent_t a, b;
    cudaEventCreate(&a); cudaEventCreate(&b);
    f();   // warm-up
    for (int r = 0; r < reps; r++) {
        cudaEventRecord(a, st); f(); cudaEventRecord(b, st); CK(cudaEventSynchronize(b));
        float ms; cudaEventElapsedTime(&ms, a, b); t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// `./pcie_probe large GIB`: how the reads scale with the SMs that issue them, and whether a
// region as large as the host-placed experts (GIB GiB, page-locked, mapped) reads as fast as
// 2 GiB do: its first and last 2 GiB and the whole of it, with SM loads, bulk rings and cp.async
// rings (a two-socket host, or page-table walks that leave the GPU's caches, would show here).
static void large_region(cudaStream_t st, int sms, size_t gib, unsigned *out) {
    size_t bytes = gib << 30, window = (size_t)2 << 30;
    char *host, *hdev;
    CK(cudaHostAlloc(&host, bytes, cudaHostAllocPortable | cudaHostAllocMapped));
    memset(host, 0x5a, bytes);
    CK(cudaHostGetDevicePointer((void **)&hdev, host, 0));
    for (int blocks : {8, 16, 33, 66, sms}) {
        float ms = time_ms(st, [&] { bulk_ring<<<blocks, 32, 32768 * 4, st>>>(hdev, window, 32768, 4, 1, out); });
        float ml = time_ms(st, [&] { ld_stride<8><<<blocks * 4, 256, 0, st>>>((const uint4 *)hdev, window / 16, out); });
        printf("%3d SMs: bulk 32K x 4 contiguous %.1f GB/s, ld_stride U8 (4 blocks an SM) %.1f GB/s\n", blocks,
               window / ms / 1e6, window / ml / 1e6);
    }
    const char *where[3] = {"first 2 GiB", "last 2 GiB", "all"};
    for (int w = 0; w < 3; w++) {
        const char *b = w == 1 ? hdev + bytes - window : hdev;
        size_t n = w == 2 ? bytes : window;
        float ms = time_ms(st, [&] { bulk_ring<<<sms, 32, 32768 * 4, st>>>(b, n, 32768, 4, 0, out); }, 1);
        float ml = time_ms(st, [&] { ld_stride<4><<<sms * 4, 256, 0, st>>>((const uint4 *)b, n / 16, out); }, 1);
        float mc = time_ms(st, [&] { cpasync_ring<4><<<sms, 512, 32768 * 4, st>>>(b, n, 32768, out); }, 1);
        float mw = time_ms(st, [&] { cpasync_ring<4><<<sms, 32, 32768 * 4, st>>>(b, n, 32768, out); }, 1);
        printf("%zu GiB region, %s: bulk 32K interleaved %.1f GB/s, ld_stride U4 %.1f GB/s, cp.async 32K x 4 by 512 "
               "threads %.1f GB/s, by one warp %.1f GB/s\n", gib, where[w], n / ms / 1e6, n / ml / 1e6, n / mc / 1e6,
               n / mw / 1e6);
    }
    CK(cudaFreeHost(host));
}

// `./pcie_probe gemv GIB`: the GEMV's pattern in a GIB GiB region of 14.16 MB experts (w1, w3, w2:
// 4 MiB of codes then 512 KiB of scales each), a launch reading 6 experts' w1 and w3 (256 items of
// 32 KB codes + 4 KB scales each): random experts against the region read in order, with and
// without the scales, by the bulk engine and by cp.async
static void gemv_pattern(cudaStream_t st, int sms, size_t gib, unsigned *out) {
    size_t bytes = gib << 30, mat = (4u << 20) + (512u << 10), expert = 3 * mat, n_experts = bytes / expert;
    char *host, *hdev;
    CK(cudaHostAlloc(&host, bytes, cudaHostAllocPortable | cudaHostAllocMapped));
    memset(host, 0x5a, bytes);
    CK(cudaHostGetDevicePointer((void **)&hdev, host, 0));
    const int launches = 40, per = 6 * 256;
    std::vector<ulonglong2> seq((size_t)launches * per), rnd((size_t)launches * per);
    uint64_t r = 12345;
    for (int l = 0; l < launches; l++)
        for (int e = 0; e < 6; e++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            size_t pick = (r >> 33) % n_experts, in_order = (size_t)l * 6 + e;
            for (int m = 0; m < 2; m++)
                for (int i = 0; i < 128; i++) {
                    size_t k = (size_t)l * per + e * 256 + m * 128 + i;
                    for (int v = 0; v < 2; v++) {
                        size_t base = (v ? pick : in_order) * expert + m * mat;
                        (v ? rnd : seq)[k] = make_ulonglong2(base + (size_t)i * 32768, base + (4u << 20) + (size_t)i * 4096);
                    }
                }
        }
    ulonglong2 *d_items;
    CK(cudaMalloc(&d_items, seq.size() * sizeof(ulonglong2)));
    std::vector<Picks> picks(2 * launches);
    for (size_t k = 0; k < seq.size(); k += 256)
        for (int v = 0; v < 2; v++)
            picks[v * launches + k / per].expert[k % per / 256] = (v ? rnd : seq)[k].x / expert;
    const char *wheres[3] = {"table in global", "table in shared", "computed"};
    for (int v = 0; v < 2; v++) {
        CK(cudaMemcpy(d_items, (v ? rnd : seq).data(), seq.size() * sizeof(ulonglong2), cudaMemcpyHostToDevice));
        for (int where : {0, 1, 2})
            for (unsigned sbytes : {0u, 4096u})
                for (int bulk : {1, 0}) {
                    float ms = time_ms(st, [&] {
                        for (int l = 0; l < launches; l++)
                            gather_ring<<<sms, bulk ? 32 : 512, 4 * 36864, st>>>(hdev, d_items + (size_t)l * per, per, 32768,
                                                                                  sbytes, bulk, where, picks[v * launches + l], out);
                    });
                    double moved = (double)launches * per * (32768 + sbytes);
                    printf("gemv pattern, %s experts, %s, %s, %s: %.1f GB/s (%.1f us an expert's w1+w3)\n", v ? "random" : "in-order",
                           wheres[where], sbytes ? "codes + scales" : "codes only", bulk ? "bulk" : "cp.async 512 threads",
                           moved / ms / 1e6, ms * 1000 / (launches * 6));
                }
    }
    CK(cudaFree(d_items));
    CK(cudaFreeHost(host));
}

// `./pcie_probe stream GIB`: the copy engine driven by a host thread. Each launch is one layer:
// block 0 posts the layer's 6 picked experts (14.16 MB each) in mapped host memory (mail), a host
// thread sees them, copies the first `nhost` picks into device slots (cudaMemcpyAsync on its own
// stream) and after each copy sets the slot's ready flag to the layer's tag (cuStreamWriteValue32);
// the launch's blocks wait for each slot's flag and read it from device memory with a bulk ring.
// Against it: the same launches reading the picks from host memory themselves (`direct`).
struct Mail { unsigned tag, pick[7]; };
__device__ __forceinline__ unsigned pick_of(unsigned tag, int j, unsigned n) { return (tag * 2654435761u + j * 40503u) % n; }
__global__ void stream_layer(Mail *mail, const unsigned *ready, const char *staged, const char *hostdev, size_t expert,
                             unsigned n_experts, unsigned tag, int nhost, int direct, unsigned *out) {
    extern __shared__ __align__(128) char ring[];
    __shared__ __align__(8) uint64_t bar[4];
    if (threadIdx.x != 0) return;
    if (blockIdx.x == 0) {
        for (int j = 0; j < 6; j++) mail->pick[j] = pick_of(tag, j, n_experts);
        __threadfence_system();
        *(volatile unsigned *)&mail->tag = tag;
    }
    const unsigned chunk = 32768;
    size_t per = expert / chunk, n = nhost * per;
    size_t count = n > blockIdx.x ? (n - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    for (int s = 0; s < 4; s++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(sm(&bar[s])));
    asm volatile("fence.mbarrier_init.release.cluster;");
    int waited = -1;
    auto issue = [&](size_t k) {
        size_t i = blockIdx.x + k * gridDim.x, j = i / per, c = i % per;
        const char *p;
        if (direct) p = hostdev + pick_of(tag, (int)j, n_experts) * expert + c * chunk;
        else {
            if ((int)j > waited) {
                unsigned v;
                do { asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(ready + j) : "memory"); if (v != tag) __nanosleep(128); } while (v != tag);
                asm volatile("fence.proxy.async.global;" ::: "memory");
                waited = (int)j;
            }
            p = staged + j * expert + c * chunk;
        }
        int st = k % 4;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sm(&bar[st])), "r"(chunk));
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(sm(ring + (size_t)st * chunk)), "l"(p), "r"(chunk), "r"(sm(&bar[st])) : "memory");
    };
    unsigned sum = 0;
    for (size_t k = 0; k < count && k < 4; k++) issue(k);
    for (size_t k = 0; k < count; k++) {
        asm volatile("{ .reg .pred p; W%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1; @!p bra W%=; }" ::"r"(sm(&bar[k % 4])), "r"((unsigned)(k / 4) & 1));
        sum += *(volatile unsigned *)(ring + (k % 4) * chunk);
        if (k + 4 < count) issue(k + 4);
    }
    atomicAdd(out, sum);
}
static void copy_thread(Mail *mail, const char *host, char *staged, unsigned *ready, size_t expert, unsigned n_experts,
                        unsigned first, unsigned last, int nhost, cudaStream_t cs) {
    CK(cudaSetDevice(0));
    for (unsigned tag = first; tag <= last; tag++) {
        unsigned L = tag % 43;
        while (*(volatile unsigned *)&mail[L].tag != tag) _mm_pause();
        for (int j = 0; j < nhost; j++) {
            unsigned pk = ((volatile unsigned *)mail[L].pick)[j];
            CK(cudaMemcpyAsync(staged + j * expert, host + pk * expert, expert, cudaMemcpyHostToDevice, cs));
            if (cuStreamWriteValue32((CUstream)cs, (CUdeviceptr)(ready + j), tag, 0) != CUDA_SUCCESS) { printf("write value failed\n"); exit(1); }
        }
    }
}
static void stream_experiment(cudaStream_t st, int sms, size_t gib, unsigned *out) {
    size_t bytes = gib << 30, expert = 3 * ((4u << 20) + (512u << 10));
    unsigned n_experts = (unsigned)(bytes / expert);
    char *host, *hdev, *staged; Mail *mail, *maildev; unsigned *ready;
    CK(cudaHostAlloc(&host, bytes, cudaHostAllocPortable | cudaHostAllocMapped));
    memset(host, 0x5a, bytes);
    CK(cudaHostGetDevicePointer((void **)&hdev, host, 0));
    CK(cudaHostAlloc(&mail, 43 * sizeof(Mail), cudaHostAllocPortable | cudaHostAllocMapped));
    memset(mail, 0, 43 * sizeof(Mail));
    CK(cudaHostGetDevicePointer((void **)&maildev, mail, 0));
    CK(cudaMalloc(&staged, 6 * expert));
    CK(cudaMalloc(&ready, 64)); CK(cudaMemset(ready, 0, 64));
    cudaStream_t cs; CK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
    CK(cudaFuncSetAttribute(stream_layer, cudaFuncAttributeMaxDynamicSharedMemorySize, 4 * 32768));
    unsigned tag = 1;
    const int tokens = 8;
    for (int nhost : {0, 1, 3, 6})
        for (int direct : {1, 0}) {
            if (nhost == 0 && !direct) continue;   // nothing to copy: the thread would wait for posts it may miss
            std::vector<float> t;
            for (int rep = 0; rep < 4; rep++) {   // rep 0: warm-up
                unsigned first = tag, last = tag + tokens * 43 - 1;
                std::thread th;
                if (!direct) th = std::thread(copy_thread, mail, host, staged, ready, expert, n_experts, first, last, nhost, cs);
                cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
                cudaEventRecord(a, st);
                for (unsigned g = first; g <= last; g++)
                    stream_layer<<<sms, 32, 4 * 32768, st>>>(maildev + g % 43, ready, staged, hdev, expert, n_experts, g, nhost, direct, out);
                cudaEventRecord(b, st);
                CK(cudaEventSynchronize(b));
                if (th.joinable()) th.join();
                CK(cudaStreamSynchronize(cs));
                float ms; cudaEventElapsedTime(&ms, a, b);
                if (rep) t.push_back(ms / tokens);
                tag = last + 1;
            }
            std::sort(t.begin(), t.end());
            double moved = 43.0 * nhost * expert;
            printf("stream: %d host experts a layer, %s: %.3f ms a token of 43 layers, %.1f GB/s\n", nhost,
                   direct ? "read by the SMs over PCIe" : "copied by a host thread's copy engine", t[1], moved / t[1] / 1e6);
        }
    CK(cudaFreeHost(host)); CK(cudaFreeHost(mail)); CK(cudaFree(staged)); CK(cudaFree(ready));
}

int main(int argc, char **argv) {
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    unsigned *out; CK(cudaMalloc(&out, 4));
    CK(cudaFuncSetAttribute(bulk_ring, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    CK(cudaFuncSetAttribute(cpasync_ring<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    CK(cudaFuncSetAttribute(cpasync_ring<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    CK(cudaFuncSetAttribute(gather_ring, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    if (argc == 3 && !strcmp(argv[1], "gemv")) {
        gemv_pattern(st, sms, (size_t)atol(argv[2]), out);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "stream")) {
        stream_experiment(st, sms, (size_t)atol(argv[2]), out);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "large")) {
        large_region(st, sms, (size_t)atol(argv[2]), out);
        return 0;
    }
    size_t bytes = (size_t)2 << 30;
    char *host, *hdev, *dev, *dst;
    CK(cudaHostAlloc(&host, bytes, cudaHostAllocPortable | cudaHostAllocMapped));
    memset(host, 0x5a, bytes);
    CK(cudaHostGetDevicePointer((void **)&hdev, host, 0));
    CK(cudaMalloc(&dev, bytes)); CK(cudaMemset(dev, 0x5a, bytes));
    CK(cudaMalloc(&dst, bytes));
    const char *names[2] = {"host", "device"};
    char *bufs[2] = {hdev, dev};
    for (int m = 0; m < 2; m++) {
        const uint4 *b = (const uint4 *)bufs[m];
        size_t n16 = bytes / 16;
        for (int bps : {1, 2, 4, 8, 16}) {
            float ms4 = time_ms(st, [&] { ld_stride<4><<<sms * bps, 256, 0, st>>>(b, n16, out); });
            float ms8 = time_ms(st, [&] { ld_stride<8><<<sms * bps, 256, 0, st>>>(b, n16, out); });
            printf("%s ld_stride blocks/SM %2d: U4 %.1f GB/s  U8 %.1f GB/s\n", names[m], bps, bytes / ms4 / 1e6, bytes / ms8 / 1e6);
        }
        for (size_t span : {(size_t)4096, (size_t)32768, (size_t)262144}) {
            float ms = time_ms(st, [&] { ld_warp_span<8><<<sms * 4, 256, 0, st>>>(b, n16, span / 16, out); });
            printf("%s ld_warp_span %6zu B (4 blocks/SM, U8): %.1f GB/s\n", names[m], span, bytes / ms / 1e6);
        }
        for (unsigned chunk : {16384u, 32768u}) {
            float ms2 = time_ms(st, [&] { cpasync_ring<2><<<sms, 512, chunk * 2, st>>>(bufs[m], bytes, chunk, out); });
            float ms4 = time_ms(st, [&] { cpasync_ring<4><<<sms, 512, chunk * 4, st>>>(bufs[m], bytes, chunk, out); });
            printf("%s cp.async chunk %5u (512 threads, 1 block/SM): 2 stages %.1f GB/s, 4 stages %.1f GB/s\n", names[m],
                   chunk, bytes / ms2 / 1e6, bytes / ms4 / 1e6);
        }
        for (unsigned chunk : {4096u, 16384u, 32768u}) for (int stages : {2, 4, 6}) for (int bps : {1, 2}) for (int contig : {0, 1}) {
            size_t smem = (size_t)chunk * stages;
            if (smem * bps > 220 * 1024) continue;
            float ms = time_ms(st, [&] { bulk_ring<<<sms * bps, 32, smem, st>>>(bufs[m], bytes, chunk, stages, contig, out); });
            printf("%s bulk chunk %5u stages %d blocks/SM %d %s: %.1f GB/s\n", names[m], chunk, stages, bps, contig ? "contiguous" : "interleaved", bytes / ms / 1e6);
        }
    }
    // ordinary memory in transparent huge pages, registered read-only and mapped
    {
        char *anon = (char *)mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        int adv = madvise(anon, bytes, MADV_HUGEPAGE);
        memset(anon, 0x5a, bytes);
        cudaError_t re = cudaHostRegister(anon, bytes, cudaHostRegisterMapped | cudaHostRegisterReadOnly);
        printf("THP region (madvise %d) registered: %s\n", adv, cudaGetErrorString(re));
        if (re == cudaSuccess) {
            char *ad; CK(cudaHostGetDevicePointer((void **)&ad, anon, 0));
            size_t n16 = bytes / 16;
            for (int bps : {1, 2, 4}) {
                float ms = time_ms(st, [&] { ld_stride<4><<<sms * bps, 256, 0, st>>>((const uint4 *)ad, n16, out); });
                printf("THP ld_stride blocks/SM %d U4: %.1f GB/s\n", bps, bytes / ms / 1e6);
            }
            for (unsigned chunk : {16384u, 32768u}) for (int contig : {0, 1}) {
                float ms = time_ms(st, [&] { bulk_ring<<<sms, 32, chunk * 4, st>>>(ad, bytes, chunk, 4, contig, out); });
                printf("THP bulk chunk %5u stages 4 %s: %.1f GB/s\n", chunk, contig ? "contiguous" : "interleaved", bytes / ms / 1e6);
            }
            float cm = time_ms(st, [&] { CK(cudaMemcpyAsync(dst, anon, bytes, cudaMemcpyHostToDevice, st)); });
            printf("THP copy engine: %.1f GB/s\n", bytes / cm / 1e6);
            CK(cudaHostUnregister(anon));
        }
        munmap(anon, bytes);
    }
    // a file's pages (the page cache), mmapped read-only and registered in place
    {
        size_t fbytes = (size_t)1 << 30;
        int fd = open("/tmp/probe-file.bin", O_RDWR | O_CREAT | O_TRUNC, 0600);
        std::vector<char> block(1 << 20, 0x5a);
        for (size_t done = 0; done < fbytes; done += block.size()) if (write(fd, block.data(), block.size()) < 0) break;
        char *fm = (char *)mmap(nullptr, fbytes, PROT_READ, MAP_SHARED, fd, 0);
        cudaError_t re = cudaHostRegister(fm, fbytes, cudaHostRegisterMapped | cudaHostRegisterReadOnly);
        printf("file mmap registered read-only: %s\n", cudaGetErrorString(re));
        if (re == cudaSuccess) {
            char *fdp; CK(cudaHostGetDevicePointer((void **)&fdp, fm, 0));
            float ms = time_ms(st, [&] { ld_stride<4><<<sms * 4, 256, 0, st>>>((const uint4 *)fdp, fbytes / 16, out); });
            printf("file ld_stride 4/SM: %.1f GB/s\n", fbytes / ms / 1e6);
            ms = time_ms(st, [&] { bulk_ring<<<sms, 32, 32768 * 4, st>>>(fdp, fbytes, 32768, 4, 0, out); });
            printf("file bulk 32K interleaved: %.1f GB/s\n", fbytes / ms / 1e6);
            CK(cudaHostUnregister(fm));
        } else cudaGetLastError();
        munmap(fm, fbytes); close(fd); unlink("/tmp/probe-file.bin");
    }
    float ce = time_ms(st, [&] { CK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, st)); });
    printf("copy engine H2D 2 GiB: %.1f GB/s\n", bytes / ce / 1e6);
    size_t ex = 14u << 20;
    float ce14 = time_ms(st, [&] { for (int i = 0; i < 140; i++) CK(cudaMemcpyAsync(dst + (i % 6) * ex, host + (i * 7919 % 140) * ex, ex, cudaMemcpyHostToDevice, st)); });
    printf("copy engine H2D 140 x 14 MiB: %.1f GB/s\n", 140.0 * ex / ce14 / 1e6);

    // switch nodes: 43 layers x 6 slots, each a switch over 140 host experts' copies (14 MiB)
    int layers = 43, slots = 6, branches = 140;
    cudaGraph_t g; CK(cudaGraphCreate(&g, 0));
    std::vector<cudaGraphConditionalHandle> handles(layers * slots);
    cudaGraphConditionalHandle *dh; unsigned *dvals;
    CK(cudaMalloc(&dh, sizeof(cudaGraphConditionalHandle) * layers * slots));
    CK(cudaMalloc(&dvals, 4 * layers * slots));
    cudaGraphNode_t prev = nullptr;
    for (int l = 0; l < layers; l++) {
        for (int s = 0; s < slots; s++) CK(cudaGraphConditionalHandleCreate(&handles[l * slots + s], g, 0, 0));
    }
    CK(cudaMemcpy(dh, handles.data(), sizeof(cudaGraphConditionalHandle) * handles.size(), cudaMemcpyHostToDevice));
    for (int l = 0; l < layers; l++) {
        cudaGraphNode_t setk;
        cudaKernelNodeParams kp = {};
        cudaGraphConditionalHandle *hl = dh + l * slots; const unsigned *vl = dvals + l * slots; int n = slots;
        void *args[] = {&hl, &vl, &n};
        kp.func = (void *)set_switches; kp.gridDim = dim3(1); kp.blockDim = dim3(32); kp.kernelParams = args;
        CK(cudaGraphAddKernelNode(&setk, g, prev ? &prev : nullptr, prev ? 1 : 0, &kp));
        std::vector<cudaGraphNode_t> sw(slots);
        for (int s = 0; s < slots; s++) {
            cudaGraphNodeParams np = {};
            np.type = cudaGraphNodeTypeConditional;
            np.conditional.handle = handles[l * slots + s];
            np.conditional.type = cudaGraphCondTypeSwitch;
            np.conditional.size = branches;
            CK(cudaGraphAddNode(&sw[s], g, &setk, nullptr, 1, &np));
            for (int b = 0; b < branches; b++) {
                cudaGraphNode_t c;
                CK(cudaGraphAddMemcpyNode1D(&c, np.conditional.phGraph_out[b], nullptr, 0, dst + s * ex, host + (size_t)(b % 140) * ex % (bytes - ex), ex, cudaMemcpyHostToDevice));
            }
        }
        cudaGraphNode_t join; CK(cudaGraphAddEmptyNode(&join, g, sw.data(), slots));
        prev = join;
    }
    cudaGraphExec_t ge;
    cudaError_t ie = cudaGraphInstantiate(&ge, g, 0);
    printf("switch graph instantiate: %s\n", cudaGetErrorString(ie));
    if (ie == cudaSuccess) {
        for (int active : {0, 1, 3, 6}) {
            std::vector<unsigned> v(layers * slots);
            for (int i = 0; i < layers * slots; i++) v[i] = (i % slots) < active ? (i * 37) % branches : branches;
            CK(cudaMemcpy(dvals, v.data(), 4 * v.size(), cudaMemcpyHostToDevice));
            float ms = time_ms(st, [&] { CK(cudaGraphLaunch(ge, st)); });
            double moved = (double)layers * active * ex;
            printf("switch graph, %d copies a layer: %.2f ms, %.1f GB/s\n", active, ms, moved / ms / 1e6);
        }
    }
    CK(cudaStreamSynchronize(st));
    printf("probe done\n");
    return 0;
}
