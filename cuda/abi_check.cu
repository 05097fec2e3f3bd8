// abi_check.cu: tessera's C ABI on a real GPU (TESSERA_DRIVER=cuda).
//
// Every allocation comes from libtessera.so through include/tessera.h; kernels write a pattern
// into each one (a function of the allocation's seed and the byte offset) and a verify kernel
// checks every live allocation after every phase, counting mismatches on the device. Phases:
//   1. remapping: fill most of a 256 MiB cap with page-sized blocks on two streams, free every
//      other one, then allocate blocks far larger than any free range (only remapping fully free
//      pages can serve them); stats.remaps must grow and every survivor keep its data;
//   2. an OOM above the cap: NULL, TESSERA_ERROR_OUT_OF_MEMORY, "CUDA out of memory." first;
//   3. mixed sizes (512 B .. 40 MiB) on two streams, then a seeded random alloc/free churn;
//   4. record_stream: a block read by a long kernel on another stream is freed, under a cap that
//      leaves no other memory; until that stream is done its memory must not be handed out again;
//   5. a block freed on one stream while that stream's work on it is queued must not be handed to
//      another stream before that work is done (same cap trick);
//   6. a CUDA graph capture (global mode) routed to a private pool: allocations, a free and a
//      reuse inside the capture (driver allocations in relaxed mode), an ordinary allocation on
//      another stream meanwhile; the capture must end valid, its replay must write the patterns,
//      the pool's memory must stay private until released, and then come back;
//   7. free everything, empty the cache: nothing stays reserved.
// Every CUDA call is checked (file:line, error name, exit 1). Prints a summary and
// "abi_check: OK".
//
// Build and run (scripts/gpu-check.sh does this):
//   nvcc -std=c++17 -O2 -Iinclude cuda/abi_check.cu -Ltarget/release -ltessera
//        -Xlinker -rpath -Xlinker $PWD/target/release -o abi_check && ./abi_check
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "tessera.h"

// ---------------------------------------------------------------------------------------------
// Checking.
// ---------------------------------------------------------------------------------------------

#define CUDA_CHECK(call)                                                                        \
  do {                                                                                          \
    cudaError_t err_ = (call);                                                                  \
    if (err_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "abi_check: FAIL %s:%d: %s returned %s (%s)\n", __FILE__, __LINE__,  \
                   #call, cudaGetErrorName(err_), cudaGetErrorString(err_));                    \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

// After a kernel launch: the launch itself, then (when the work is synchronized later) its run.
#define LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

// CHECK(cond, "printf format", args...): prints file:line, the message and tessera's last error.
#define CHECK(cond, ...)                                                                        \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      std::fprintf(stderr, "abi_check: FAIL %s:%d: %s\n  ", __FILE__, __LINE__, #cond);         \
      std::fprintf(stderr, __VA_ARGS__);                                                        \
      std::fprintf(stderr, "\n  tessera_last_error_code() = %d, tessera_last_error() = \"%s\"\n", \
                   tessera_last_error_code(), tessera_last_error());                            \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

static const size_t MiB = size_t(1) << 20;
static const size_t LIMIT = 256 * MiB;  // the cap for phases 1 and 2 (tessera_configure)
static const int DEV = 0;

// ---------------------------------------------------------------------------------------------
// The pattern: byte i of the allocation with seed s.
// ---------------------------------------------------------------------------------------------

__host__ __device__ inline uint64_t mix(uint64_t seed, uint64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__host__ __device__ inline uint8_t pattern_byte(uint64_t seed, uint64_t i) {
  return uint8_t(mix(seed, i >> 3) >> ((i & 7) * 8));
}

__global__ void fill_kernel(uint8_t *p, size_t n, uint64_t seed) {
  size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    p[i] = pattern_byte(seed, i);
}

// Counts the bytes of p[0..n) that differ from the pattern into *bad, and the lowest bad offset
// into *first_bad (which starts at ULLONG_MAX).
__global__ void verify_kernel(const uint8_t *p, size_t n, uint64_t seed, unsigned long long *bad,
                              unsigned long long *first_bad) {
  size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (p[i] != pattern_byte(seed, i)) {
      atomicAdd(bad, 1ull);
      atomicMin(first_bad, (unsigned long long)i);
    }
  }
}

// Keeps a stream busy for about `cycles` SM clock cycles.
__global__ void spin_kernel(long long cycles) {
  long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

static void launch_dims(size_t n, unsigned *blocks, unsigned *threads) {
  *threads = 256;
  size_t b = (n + 255) / 256;
  *blocks = unsigned(b < 2048 ? (b == 0 ? 1 : b) : 2048);
}

// ---------------------------------------------------------------------------------------------
// Live allocations, and per-slot mismatch counters on the device.
// ---------------------------------------------------------------------------------------------

struct Live {
  uint8_t *p;
  size_t size;
  cudaStream_t stream;
  uint64_t seed;
};

static const int MAX_SLOTS = 4096;
static std::vector<Live> live;
static uint64_t next_seed = 1;
static unsigned long long *d_bad = nullptr;        // MAX_SLOTS counters
static unsigned long long *d_first_bad = nullptr;  // MAX_SLOTS lowest bad offsets
static unsigned long long verified_bytes = 0;
static unsigned long long verify_passes = 0;
static cudaStream_t s1, s2;

static void fill_on(const Live &l) {
  unsigned b, t;
  launch_dims(l.size, &b, &t);
  fill_kernel<<<b, t, 0, l.stream>>>(l.p, l.size, l.seed);
  LAUNCH_CHECK();
}

// tessera_malloc + pattern fill on the allocation's stream.
static uint8_t *alloc_filled(size_t size, cudaStream_t stream) {
  tessera_clear_last_error();
  void *p = tessera_malloc(size, DEV, stream);
  CHECK(p != nullptr, "tessera_malloc(%zu, %d, %p) failed", size, DEV, (void *)stream);
  CHECK(uintptr_t(p) % 512 == 0, "tessera_malloc(%zu) = %p is not 512-byte aligned", size, p);
  for (const Live &o : live) {
    uintptr_t a = uintptr_t(p), b = uintptr_t(o.p);
    CHECK(a + size <= b || b + o.size <= a, "tessera_malloc(%zu) = %p overlaps live %p (%zu B)",
          size, p, (void *)o.p, o.size);
  }
  Live l{static_cast<uint8_t *>(p), size, stream, next_seed++};
  live.push_back(l);
  fill_on(l);
  return l.p;
}

static void free_live(size_t index) {
  Live l = live[index];
  tessera_clear_last_error();
  tessera_free(l.p, l.size, DEV, l.stream);
  CHECK(tessera_last_error_code() == TESSERA_OK, "tessera_free(%p, %zu B) failed", (void *)l.p,
        l.size);
  live[index] = live.back();
  live.pop_back();
}

static void free_ptr(const void *p) {
  for (size_t i = 0; i < live.size(); i++) {
    if (live[i].p == p) {
      free_live(i);
      return;
    }
  }
  CHECK(false, "internal: %p is not live", p);
}

// Verifies every live allocation (each on its own stream), then waits and reads the counters.
static void verify_all(const char *when) {
  CHECK(live.size() <= size_t(MAX_SLOTS), "internal: more than %d live allocations", MAX_SLOTS);
  size_t n = live.size();
  if (n == 0) return;
  std::vector<unsigned long long> bad(n, 0), first(n, ULLONG_MAX);
  // Reset the counters (lowest bad offset: ULLONG_MAX, all bytes 0xFF), then wait for every stream
  // and for the resets before any verify kernel starts.
  CUDA_CHECK(cudaMemset(d_bad, 0, n * sizeof bad[0]));
  CUDA_CHECK(cudaMemset(d_first_bad, 0xFF, n * sizeof first[0]));
  CUDA_CHECK(cudaDeviceSynchronize());
  for (size_t i = 0; i < n; i++) {
    unsigned b, t;
    launch_dims(live[i].size, &b, &t);
    verify_kernel<<<b, t, 0, live[i].stream>>>(live[i].p, live[i].size, live[i].seed, d_bad + i,
                                               d_first_bad + i);
    LAUNCH_CHECK();
    verified_bytes += live[i].size;
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(bad.data(), d_bad, n * sizeof bad[0], cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(first.data(), d_first_bad, n * sizeof first[0], cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < n; i++) {
    CHECK(bad[i] == 0,
          "%s: allocation %p (%zu B, stream %p) has %llu bytes that lost their pattern, the first "
          "at offset %llu: its memory was reused, unmapped or remapped while live",
          when, (void *)live[i].p, live[i].size, (void *)live[i].stream, bad[i], first[i]);
  }
  ++verify_passes;
}

static tessera_stats stats() {
  tessera_stats s;
  std::memset(&s, 0, sizeof s);
  s.size = sizeof s;
  int rc = tessera_get_stats(DEV, &s);
  CHECK(rc == 0, "tessera_get_stats(%d) returned %d", DEV, rc);
  return s;
}

static bool overlaps(const void *a, size_t an, const void *b, size_t bn) {
  uintptr_t x = uintptr_t(a), y = uintptr_t(b);
  return x < y + bn && y < x + an;
}

// ---------------------------------------------------------------------------------------------
// Phases.
// ---------------------------------------------------------------------------------------------

// cudaStreamQuery without leaving cudaErrorNotReady behind as the runtime's last error.
static bool stream_busy(cudaStream_t s) {
  cudaError_t q = cudaStreamQuery(s);
  CHECK(q == cudaSuccess || q == cudaErrorNotReady, "cudaStreamQuery = %s", cudaGetErrorName(q));
  (void)cudaGetLastError();
  return q == cudaErrorNotReady;
}

static const long long HALF_SECOND = 1000000000LL;  // SM clock cycles, ~0.5 s at ~2 GHz

static size_t phase_remap() {
  // The first allocation says what a page is here.
  uint8_t *probe = alloc_filled(512, s1);
  tessera_stats s = stats();
  size_t page = size_t(s.page_size);
  CHECK(page >= 2 * MiB && (page & (page - 1)) == 0, "page_size %zu", page);
  CHECK(s.limit_bytes == LIMIT, "limit_bytes %llu, configured %zu",
        (unsigned long long)s.limit_bytes, LIMIT);
  free_ptr(probe);
  tessera_empty_cache(DEV);
  CHECK(stats().reserved_bytes == 0, "reserved %llu after emptying an unused cache",
        (unsigned long long)stats().reserved_bytes);

  size_t pages = LIMIT / page;
  CHECK(pages >= 24, "the %zu B cap holds only %zu pages of %zu B", LIMIT, pages, page);
  size_t nfill = pages - 8;  // most of the cap
  std::vector<uint8_t *> blocks;
  // Stream 1 is kept busy first, so that its blocks' fill kernels are still queued when they are
  // freed and their pages are wanted elsewhere.
  spin_kernel<<<1, 1, 0, s1>>>(HALF_SECOND);
  LAUNCH_CHECK();
  for (size_t i = 0; i < nfill; i++) blocks.push_back(alloc_filled(page, i % 2 ? s2 : s1));
  s = stats();
  CHECK(s.reserved_bytes >= nfill * page && s.reserved_bytes <= LIMIT,
        "reserved %llu for %zu blocks of %zu B under a %zu B cap",
        (unsigned long long)s.reserved_bytes, nfill, page, LIMIT);

  // Free every other block: the stream-1 ones, whose fills have not run yet.
  for (size_t i = 0; i < nfill; i += 2) free_ptr(blocks[i]);
  s = stats();
  uint64_t remaps_before = s.remaps;
  size_t free_pages = nfill / 2, spare = pages - nfill;
  std::printf("abi_check: cap %zu MiB, page %zu MiB: %zu blocks, %zu freed in single-page holes\n",
              LIMIT / MiB, page / MiB, nfill, free_pages);

  // A block of (spare + free_pages / 2) pages: more than the cap's unused pages, far more than any
  // hole; only gathering freed pages serves it. It is allocated on stream 2 from pages freed on
  // stream 1 while stream 1's fills of them are still queued: tessera must wait for them before it
  // unmaps those pages (were it not to, the late fills would write through unmapped addresses, an
  // illegal access that CUDA_CHECK reports, or into the new block, which verify_all reports).
  bool s1_busy = stream_busy(s1);
  size_t big1_pages = spare + free_pages / 2;
  uint8_t *big1 = alloc_filled(big1_pages * page, s2);
  std::printf("abi_check: stream 1 was %s when the large block was asked for, %s when it came\n",
              s1_busy ? "busy" : "idle", stream_busy(s1) ? "busy" : "idle");
  verify_all("after the first large block");
  s = stats();
  CHECK(s.remaps > remaps_before,
        "a %zu-page block under a full cap was served without remapping (remaps %llu)",
        big1_pages, (unsigned long long)s.remaps);
  CHECK(s.reserved_bytes <= LIMIT, "reserved %llu exceeds the cap",
        (unsigned long long)s.reserved_bytes);
  // What is left: every remaining free page, gathered again, on stream 1.
  size_t big2_pages = spare + free_pages - big1_pages;
  uint8_t *big2 = alloc_filled(big2_pages * page, s1);
  verify_all("after the second large block");
  s = stats();
  std::printf("abi_check: remap phase: blocks of %zu and %zu pages served, %llu remaps, "
              "reserved %llu MiB of a %zu MiB cap\n",
              big1_pages, big2_pages, (unsigned long long)s.remaps,
              (unsigned long long)(s.reserved_bytes / MiB), LIMIT / MiB);

  // base_alloc of an interior device pointer.
  size_t bsize = 0;
  void *base = tessera_base_alloc(big1 + 12345, &bsize);
  CHECK(base == big1 && bsize == big1_pages * page, "base_alloc(big1 + 12345) = %p, %zu B", base,
        bsize);

  // Above the cap: an OOM that says so, and nothing live is harmed.
  tessera_stats before = stats();
  tessera_clear_last_error();
  void *p = tessera_malloc(LIMIT + page, DEV, s1);
  CHECK(p == nullptr, "an allocation above the cap succeeded");
  CHECK(tessera_last_error_code() == TESSERA_ERROR_OUT_OF_MEMORY, "code %d",
        tessera_last_error_code());
  CHECK(std::strncmp(tessera_last_error(), "CUDA out of memory.", 19) == 0,
        "the OOM message does not start with \"CUDA out of memory.\"");
  CHECK(stats().ooms == before.ooms + 1, "the OOM was not counted");
  std::printf("abi_check: OOM message: %.160s...\n", tessera_last_error());
  tessera_clear_last_error();
  verify_all("after an OOM");

  (void)big2;
  while (!live.empty()) free_live(live.size() - 1);
  CUDA_CHECK(cudaDeviceSynchronize());
  tessera_empty_cache(DEV);
  s = stats();
  CHECK(s.reserved_bytes == 0 && s.allocated_bytes == 0,
        "after freeing everything and empty_cache: reserved %llu allocated %llu",
        (unsigned long long)s.reserved_bytes, (unsigned long long)s.allocated_bytes);
  return page;
}

static uint64_t rng_state = 0x5EED5EED12345678ull;
static uint64_t rng() {
  rng_state = mix(rng_state, 0x1234);
  return rng_state;
}

static void phase_mixed_and_churn() {
  // A larger cap for this phase, set at run time.
  CHECK(tessera_set_limit(DEV, 1024 * MiB) == 0, "tessera_set_limit(1 GiB)");
  CHECK(stats().limit_bytes == 1024 * MiB, "limit_bytes after set_limit");
  const size_t sizes[] = {512, 1000, 4096, 65536, MiB, MiB + 1, 3 * MiB + 512, 7 * MiB + 100,
                          40 * MiB};
  for (size_t sz : sizes) {
    alloc_filled(sz, s1);
    alloc_filled(sz, s2);
  }
  verify_all("after the mixed sizes");

  const size_t cap_live = 600 * MiB;  // keep well under the 1 GiB cap: an OOM here is a failure
  size_t live_bytes = 0;
  for (const Live &l : live) live_bytes += l.size;
  const int ops = 3000;
  for (int op = 1; op <= ops; op++) {
    uint64_t r = rng();
    size_t size = (r & 7) < 5 ? 1 + size_t((r >> 8) % MiB)                 // 5/8 small
                              : MiB + 1 + size_t((r >> 8) % (40 * MiB));   // 3/8 large
    bool do_free = !live.empty() && ((r >> 60) < 7 || live_bytes + size > cap_live);
    if (do_free) {
      size_t i = size_t((r >> 32) % live.size());
      live_bytes -= live[i].size;
      free_live(i);
    } else {
      alloc_filled(size, (r >> 40) & 1 ? s2 : s1);
      live_bytes += size;
    }
    if (op % 250 == 0) verify_all("during the churn");
  }
  verify_all("after the churn");
  tessera_stats s = stats();
  std::printf("abi_check: churn: %d operations, %zu live (%zu MiB), reserved %llu MiB, "
              "peak reserved %llu MiB, remaps %llu\n",
              ops, live.size(), live_bytes / MiB, (unsigned long long)(s.reserved_bytes / MiB),
              (unsigned long long)(s.peak_reserved_bytes / MiB), (unsigned long long)s.remaps);
  while (!live.empty()) free_live(live.size() - 1);
  verify_all("after freeing the churn");
}

// Empties the cache and caps the device at `bytes`, so that the next request of that size can
// only be served from memory this phase frees.
static void tight_cap(size_t bytes) {
  CHECK(live.empty(), "internal: %zu allocations live", live.size());
  CUDA_CHECK(cudaDeviceSynchronize());
  tessera_empty_cache(DEV);
  CHECK(stats().reserved_bytes == 0, "reserved %llu with nothing live after empty_cache",
        (unsigned long long)stats().reserved_bytes);
  CHECK(tessera_set_limit(DEV, bytes) == 0, "tessera_set_limit(%zu)", bytes);
}


// Phase 4: a block read on stream 2 (record_stream) is freed while stream 2 still reads it. The cap
// leaves no other memory, so the next request of that size can only get the block back, and only
// once stream 2 is done with it.
static void phase_record_stream(size_t page) {
  const size_t n = 4 * page;
  tight_cap(n);
  uint8_t *x = alloc_filled(n, s1);
  Live xl = live.back();
  cudaEvent_t filled;
  CUDA_CHECK(cudaEventCreateWithFlags(&filled, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventRecord(filled, s1));
  CUDA_CHECK(cudaStreamWaitEvent(s2, filled, 0));
  // Stream 2: wait a while, then read x into its own counter slot (past verify_all's slots).
  spin_kernel<<<1, 1, 0, s2>>>(HALF_SECOND);
  LAUNCH_CHECK();
  // Stream-ordered resets (0 mismatches, lowest bad offset ULLONG_MAX = all bytes 0xFF).
  CUDA_CHECK(cudaMemsetAsync(d_bad + MAX_SLOTS - 1, 0, sizeof(unsigned long long), s2));
  CUDA_CHECK(cudaMemsetAsync(d_first_bad + MAX_SLOTS - 1, 0xFF, sizeof(unsigned long long), s2));
  unsigned b, t;
  launch_dims(n, &b, &t);
  verify_kernel<<<b, t, 0, s2>>>(x, n, xl.seed, d_bad + MAX_SLOTS - 1, d_first_bad + MAX_SLOTS - 1);
  LAUNCH_CHECK();

  tessera_clear_last_error();
  tessera_record_stream(x, s2);
  CHECK(tessera_last_error_code() == TESSERA_OK, "tessera_record_stream failed");
  CHECK(stream_busy(s2), "stream 2 finished its ~0.5 s of work before the free: the check below "
        "would prove nothing (a much faster GPU? raise HALF_SECOND)");
  free_ptr(x);  // freed (its own stream is 1) while stream 2 still has work queued on it

  // The same size on stream 1 at once: only x's memory exists under the cap.
  uint8_t *y = alloc_filled(n, s1);
  bool busy = stream_busy(s2);
  CHECK(!(busy && overlaps(x, n, y, n)),
        "record_stream ignored: the block freed at %p came back as %p while stream 2, recorded on "
        "it, still had work queued",
        (void *)x, (void *)y);
  CUDA_CHECK(cudaDeviceSynchronize());
  unsigned long long bad = 0, first = 0;
  CUDA_CHECK(cudaMemcpy(&bad, d_bad + MAX_SLOTS - 1, sizeof bad, cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(&first, d_first_bad + MAX_SLOTS - 1, sizeof first,
                        cudaMemcpyDeviceToHost));
  CHECK(bad == 0,
        "stream 2 read %llu wrong bytes (the first at offset %llu) of a block freed after "
        "record_stream: its memory was reused before stream 2 was done",
        bad, first);
  verified_bytes += n;
  std::printf("abi_check: record_stream: the block came back %s, after stream 2 was done\n",
              overlaps(x, n, y, n) ? "at the same address" : "elsewhere");
  CUDA_CHECK(cudaEventDestroy(filled));
  verify_all("after record_stream");
  free_ptr(y);
}

// Phase 5: a block freed on stream 1 while stream 1's work on it is still queued; stream 2 asks for
// the same size under a cap that leaves no other memory. tessera may hand it over only once stream
// 1 is done.
static void phase_cross_stream_reuse(size_t page) {
  const size_t n = 8 * page;
  tight_cap(n);
  spin_kernel<<<1, 1, 0, s1>>>(HALF_SECOND);
  LAUNCH_CHECK();
  uint8_t *z = alloc_filled(n, s1);  // its fill runs after the spin, on stream 1
  CHECK(stream_busy(s1), "stream 1 finished its ~0.5 s of work already: the check would prove "
        "nothing");
  free_ptr(z);
  uint8_t *w = alloc_filled(n, s2);
  bool busy = stream_busy(s1);
  CHECK(!(busy && overlaps(z, n, w, n)),
        "the block freed on stream 1 at %p went to stream 2 as %p while stream 1 still had work "
        "queued on it",
        (void *)z, (void *)w);
  verify_all("after cross-stream reuse");  // w's pattern survived z's late fill
  std::printf("abi_check: cross-stream reuse: stream 2 got the block only after stream 1 was "
              "done\n");
  free_ptr(w);
  CHECK(tessera_set_limit(DEV, 0) == 0, "tessera_set_limit(0) (no limit)");
}

// Phase 6: a CUDA graph capture into a private pool, as PyTorch's torch.cuda.graph drives it.
static bool capture_filter(void *ctx, cudaStream_t stream) {
  return stream == *static_cast<cudaStream_t *>(ctx);
}

static void phase_graph() {
  // Phase 5 ends with a limit of 0 (no new memory): the capture needs new pages.
  CHECK(tessera_set_limit(DEV, TESSERA_NO_LIMIT) == 0, "tessera_set_limit(NO_LIMIT)");
  // The ordinary cache holds freed memory on s1 first: the capture must not take it.
  uint8_t *warm = alloc_filled(8 * MiB, s1);
  CUDA_CHECK(cudaStreamSynchronize(s1));
  free_ptr(warm);
  const uint64_t pool = 77;
  CHECK(tessera_begin_allocate_to_pool(DEV, pool, 0, capture_filter, &s1, nullptr) == 0,
        "tessera_begin_allocate_to_pool");
  CUDA_CHECK(cudaStreamBeginCapture(s1, cudaStreamCaptureModeGlobal));
  uint8_t *a = alloc_filled(4 * MiB, s1);  // captured, not run
  uint8_t *tmp = alloc_filled(2 * MiB, s1);
  free_ptr(tmp);
  uint8_t *b = alloc_filled(2 * MiB, s1);
  CHECK(b == tmp, "a block freed into the pool during the capture is reused at once (%p, %p)",
        (void *)b, (void *)tmp);
  CHECK(a != warm && b != warm, "the capture took the ordinary cache's block");
  uint8_t *side = alloc_filled(3 * MiB, s2);  // s2 is not capturing: ordinary memory, runs now
  tessera_stats during = stats();
  CHECK(during.capture_underway == 1 && during.private_pools == 1 &&
            during.private_pool_allocated_bytes == 6 * MiB,
        "during the capture: capture_underway %llu, pools %llu, pool allocated %llu",
        (unsigned long long)during.capture_underway, (unsigned long long)during.private_pools,
        (unsigned long long)during.private_pool_allocated_bytes);
  cudaGraph_t graph;
  // Fails with cudaErrorStreamCaptureInvalidated if tessera made a call the capture forbids.
  CUDA_CHECK(cudaStreamEndCapture(s1, &graph));
  CHECK(tessera_end_allocate_to_pool(DEV, pool, 0) == 0, "tessera_end_allocate_to_pool");
  cudaGraphExec_t exec;
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CUDA_CHECK(cudaGraphLaunch(exec, s1));
  verify_all("after the graph's replay");  // the fills of a and b ran only in the replay
  CUDA_CHECK(cudaGraphLaunch(exec, s1));
  verify_all("after a second replay");
  // Pool memory stays private: freed, it does not serve an ordinary request of the same size.
  free_ptr(b);
  uint8_t *ordinary = alloc_filled(2 * MiB, s1);
  CHECK(ordinary != b, "the pool's free block served an ordinary request");
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  CUDA_CHECK(cudaDeviceSynchronize());
  free_ptr(a);
  CHECK(tessera_release_pool(DEV, pool, 0) == 0, "tessera_release_pool");
  free_ptr(ordinary);
  free_ptr(side);
  // Released, the pool joins the ordinary cache once the device is idle: empty_cache synchronizes.
  tessera_empty_cache(DEV);
  CHECK(stats().private_pools == 0, "the pool is still listed after its release and empty_cache");
  CHECK(stats().reserved_bytes == 0, "the pool's memory did not come back: %llu B reserved",
        (unsigned long long)stats().reserved_bytes);
  std::printf("abi_check: graph capture into a private pool: valid, replayed twice, pool private, "
              "memory back\n");
}

int main() {
  // This program is for a real GPU: never the simulated device.
  setenv("TESSERA_DRIVER", "cuda", 1);
  unsetenv("TESSERA_SIM");

  int ndev = 0;
  CUDA_CHECK(cudaGetDeviceCount(&ndev));
  CHECK(ndev > 0, "no CUDA device");
  CUDA_CHECK(cudaSetDevice(DEV));
  CUDA_CHECK(cudaFree(nullptr));  // make the primary context now
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, DEV));
  size_t free_b = 0, total_b = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  std::printf("abi_check: device %d: %s, %zu MiB total, %zu MiB free; tessera %s\n", DEV,
              prop.name, total_b / MiB, free_b / MiB, tessera_version());
  CHECK(free_b > 1024 * MiB + 256 * MiB, "this check needs about 1.3 GiB free on the device");

  char conf[128];
  std::snprintf(conf, sizeof conf, "limit:%zuMiB,check_invariants:true", LIMIT / MiB);
  CHECK(tessera_configure(conf) == 0, "tessera_configure(\"%s\")", conf);
  CHECK(tessera_device_count() == ndev, "tessera sees %d devices, CUDA %d",
        tessera_device_count(), ndev);

  CUDA_CHECK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
  CUDA_CHECK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
  CUDA_CHECK(cudaMalloc(&d_bad, MAX_SLOTS * sizeof(unsigned long long)));
  CUDA_CHECK(cudaMalloc(&d_first_bad, MAX_SLOTS * sizeof(unsigned long long)));

  size_t page = phase_remap();
  phase_mixed_and_churn();
  phase_record_stream(page);
  phase_cross_stream_reuse(page);
  phase_graph();

  // Phase 7: nothing live, nothing kept.
  CHECK(live.empty(), "internal: %zu allocations still live", live.size());
  CUDA_CHECK(cudaDeviceSynchronize());
  tessera_clear_last_error();
  tessera_empty_cache(-1);
  CHECK(tessera_last_error_code() == TESSERA_OK, "tessera_empty_cache(-1) failed");
  tessera_stats s = stats();
  CHECK(s.reserved_bytes == 0 && s.allocated_bytes == 0 && s.active_blocks == 0,
        "at the end: reserved %llu allocated %llu active %llu",
        (unsigned long long)s.reserved_bytes, (unsigned long long)s.allocated_bytes,
        (unsigned long long)s.active_blocks);
  CHECK(tessera_check_invariants(DEV) == 0, "tessera_check_invariants(%d)", DEV);
  CHECK(s.driver_errors == 0, "%llu driver errors were counted",
        (unsigned long long)s.driver_errors);

  CUDA_CHECK(cudaFree(d_bad));
  CUDA_CHECK(cudaFree(d_first_bad));
  CUDA_CHECK(cudaStreamDestroy(s1));
  CUDA_CHECK(cudaStreamDestroy(s2));
  std::printf("abi_check: summary: %llu allocations, %llu frees, %llu remaps, %llu OOMs, "
              "%llu verify passes, %llu bytes verified on the device, peak reserved %llu MiB\n",
              (unsigned long long)s.allocations, (unsigned long long)s.frees,
              (unsigned long long)s.remaps, (unsigned long long)s.ooms, verify_passes,
              verified_bytes, (unsigned long long)(s.peak_reserved_bytes / MiB));
  std::printf("abi_check: OK\n");
  return 0;
}
