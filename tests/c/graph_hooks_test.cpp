// graph_hooks_test.cpp: PyTorch's three CUDA-graph hooks, called exactly as PyTorch's binding
// calls them. torch/csrc/cuda/Module.cpp takes each hook's address as an integer and does
//   using FuncType = void(int, c10::cuda::MempoolId_t, std::function<bool(cudaStream_t)>);
//   std::function<FuncType> func = reinterpret_cast<FuncType*>(func_ptr);
// (and void(int, MempoolId_t) for the other two), and CUDAPluggableAllocator calls func with a
// temporary std::function. This program does the same with the addresses tessera_torch_graph_hook
// gives, with no torch header (MempoolId_t is std::pair<unsigned long long, unsigned long long>),
// and checks what tessera did: routing to the pool, the filter called and destroyed, pool memory
// kept private, the pool joining the ordinary cache at its last release, and the C++ exceptions
// for calls out of order.
//
// Runs on the simulated device: TESSERA_DRIVER=sim, TESSERA_SIM=devices:2,capacity:64MiB,
// granularity:2MiB (ffi/tests/c_programs.rs sets both). Exits 1 with a message at the first
// failure; prints "graph_hooks_test: OK" on success.
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "tessera.h"

namespace {
constexpr const char *kProgram = "graph_hooks_test";
}  // namespace
#include "check.hpp"

namespace {

using MempoolId_t = std::pair<unsigned long long, unsigned long long>;
using BeginType = void(int, MempoolId_t, std::function<bool(cudaStream_t)>);
using PoolFnType = void(int, MempoolId_t);

constexpr std::size_t kMiB = std::size_t{1} << 20;
const auto kCapture = reinterpret_cast<cudaStream_t>(std::uintptr_t{0x21});
const auto kOther = reinterpret_cast<cudaStream_t>(std::uintptr_t{0x22});


tessera_stats stats() {
  tessera_stats s{};
  s.size = sizeof s;
  CHECK(tessera_get_stats(0, &s) == 0, "tessera_get_stats failed");
  return s;
}

// The hook's address as PyTorch receives it: an integer.
std::uint64_t hook_address(const char *setter) {
  const void *p = tessera_torch_graph_hook(setter);
  CHECK(p != nullptr, std::string("tessera_torch_graph_hook(\"") + setter + "\") is NULL");
  return reinterpret_cast<std::uint64_t>(p);
}

// The "pool" of the block at `ptr` in the JSON snapshot: "[1,0]", "null", or "" if not found.
std::string pool_of(void *ptr) {
  std::size_t n = tessera_snapshot_json(0, nullptr, 0);
  std::vector<char> buf(n + 1);
  tessera_snapshot_json(0, buf.data(), buf.size());
  std::string json(buf.data());
  // A block's fields: address, size, requested_size, ... pool (a segment has "kind" instead).
  std::string key = "\"address\":" + std::to_string(reinterpret_cast<std::uintptr_t>(ptr)) + ",";
  for (std::size_t at = json.find(key); at != std::string::npos; at = json.find(key, at + 1)) {
    std::size_t end = json.find('}', at);
    std::string block = json.substr(at, end - at);
    if (block.find("\"kind\"") != std::string::npos) continue;  // a segment, not a block
    std::size_t p = block.find("\"pool\":");
    if (p == std::string::npos) return "";
    std::size_t v = p + 7;
    if (block.compare(v, 4, "null") == 0) return "null";
    if (block[v] == '[') return block.substr(v, block.find(']', v) - v + 1);
    return "";
  }
  return "";
}

// Calls `f` and returns the std::runtime_error's what(), or "" when nothing was thrown.
template <typename F>
std::string thrown(F f) {
  try {
    f();
  } catch (std::runtime_error const &e) {
    return e.what();
  } catch (...) {
    fail(__FILE__, __LINE__, "a hook threw something that is not a std::runtime_error");
  }
  return "";
}

bool contains(const std::string &s, const char *part) { return s.find(part) != std::string::npos; }

int drops = 0;
void count_drop(void *) { ++drops; }
bool accept_all(void *, cudaStream_t) { return true; }

}  // namespace

int main() {
  const char *driver = std::getenv("TESSERA_DRIVER");
  if (driver == nullptr || std::strcmp(driver, "sim") != 0) {
    std::fprintf(stderr, "graph_hooks_test: FAIL: run me with TESSERA_DRIVER=sim\n");
    return 1;
  }
  // As Module.cpp binds the setters.
  std::function<BeginType> begin =
      reinterpret_cast<BeginType *>(hook_address("set_begin_allocate_to_pool"));
  std::function<PoolFnType> end =
      reinterpret_cast<PoolFnType *>(hook_address("set_end_allocate_to_pool_fn"));
  std::function<PoolFnType> release =
      reinterpret_cast<PoolFnType *>(hook_address("set_release_pool"));
  CHECK(tessera_torch_graph_hook("set_init_fn") == nullptr &&
            tessera_last_error_code() == TESSERA_ERROR_INVALID_ARGUMENT,
        "an unknown setter name must give NULL and TESSERA_ERROR_INVALID_ARGUMENT");

  // 1. Begin: the filter (a lambda holding state, as PyTorch's captures `this`) routes kCapture.
  const MempoolId_t pool{7, 0};
  auto seen = std::make_shared<std::vector<cudaStream_t>>();
  begin(0, pool, [seen](cudaStream_t s) {
    seen->push_back(s);
    return s == kCapture;
  });
  CHECK(seen.use_count() == 2, "tessera must keep the filter (one copy) while routing");
  CHECK(stats().capture_underway == 1, "capture_underway is not 1 while routing");
  void *in_pool = tessera_malloc(4 * kMiB, 0, kCapture);
  void *ordinary = tessera_malloc(4 * kMiB, 0, kOther);
  CHECK(in_pool != nullptr && ordinary != nullptr, "allocations while routing failed");
  CHECK(!seen->empty() && seen->front() == kCapture, "the filter was not called with the stream");
  CHECK(pool_of(in_pool) == "[7,0]", "the routed allocation is not in pool (7, 0): " +
                                         pool_of(in_pool));
  CHECK(pool_of(ordinary) == "null", "an allocation on another stream is in a pool: " +
                                         pool_of(ordinary));
  tessera_stats s = stats();
  CHECK(s.private_pools == 1 && s.private_pool_allocated_bytes == 4 * kMiB,
        "stats do not show one private pool with 4 MiB allocated");

  // 2. Out of order while routing: a second begin, the last release.
  std::string e = thrown([&] { begin(0, pool, [](cudaStream_t) { return true; }); });
  CHECK(contains(e, "already routed"), "a second begin on the pool did not throw: \"" + e + "\"");
  CHECK(tessera_last_error_code() == TESSERA_ERROR_PRIVATE_POOL, "not TESSERA_ERROR_PRIVATE_POOL");
  // release is called from PyTorch's graph destructor: it never throws, it records the error.
  tessera_clear_last_error();
  e = thrown([&] { release(0, pool); });
  CHECK(e.empty() && tessera_last_error_code() == TESSERA_ERROR_PRIVATE_POOL &&
            contains(tessera_last_error(), "routed"),
        "releasing the last use while routing must be refused without a throw: \"" + e + "\"");

  // 3. End: routing stops and the filter is destroyed.
  end(0, pool);
  CHECK(seen.use_count() == 1, "the filter was not destroyed when routing ended");
  CHECK(stats().capture_underway == 0, "capture_underway is not 0 after the end");
  e = thrown([&] { end(0, pool); });
  CHECK(contains(e, "not being routed"), "a second end did not throw: \"" + e + "\"");

  // 4. Pool memory stays private: freed, it does not serve an ordinary request.
  tessera_free(in_pool, 4 * kMiB, 0, kCapture);
  void *again = tessera_malloc(4 * kMiB, 0, kCapture);
  CHECK(again != nullptr && again != in_pool, "the pool's free block served an ordinary request");
  tessera_free(again, 4 * kMiB, 0, kCapture);

  // 5. The last release: the pool is released, and its memory joins the ordinary cache at the
  //    next miss (after a device synchronize: a replay may still run).
  release(0, pool);
  CHECK(stats().private_pools == 1, "a released pool is listed until the device is idle");
  void *joined = tessera_malloc(4 * kMiB, 0, kCapture);   // the ordinary cache's own block
  void *joined2 = tessera_malloc(4 * kMiB, 0, kCapture);  // a miss: drains the pool
  CHECK(joined == in_pool || joined2 == in_pool,
        "the released pool's memory does not serve ordinary requests");
  CHECK(stats().private_pools == 0, "the pool is still listed after it was drained");
  tessera_free(joined, 4 * kMiB, 0, kCapture);
  tessera_free(joined2, 4 * kMiB, 0, kCapture);
  tessera_clear_last_error();
  e = thrown([&] { release(0, pool); });
  CHECK(e.empty() && tessera_last_error_code() == TESSERA_ERROR_PRIVATE_POOL &&
            contains(tessera_last_error(), "no private pool"),
        "releasing a released pool must be refused without a throw: \"" + e + "\"");

  // 6. A filter that throws routes nothing and crosses nothing.
  begin(0, {8, 0}, [](cudaStream_t) -> bool { throw std::runtime_error("capture info failed"); });
  void *p = tessera_malloc(kMiB, 0, kCapture);
  CHECK(p != nullptr && pool_of(p) == "null", "a throwing filter must route nothing");
  end(0, {8, 0});
  release(0, {8, 0});
  tessera_free(p, kMiB, 0, kCapture);

  // 7. The C entry point owns its context: dropped once on every path.
  CHECK(tessera_begin_allocate_to_pool(0, 9, 0, nullptr, nullptr, count_drop) ==
                TESSERA_ERROR_INVALID_ARGUMENT &&
            drops == 1,
        "a NULL filter must fail and drop the context");
  CHECK(tessera_begin_allocate_to_pool(5, 9, 0, accept_all, nullptr, count_drop) ==
                TESSERA_ERROR_INVALID_DEVICE &&
            drops == 2,
        "a bad device must fail and drop the context");
  CHECK(tessera_begin_allocate_to_pool(0, 0, 0, accept_all, nullptr, count_drop) ==
                TESSERA_ERROR_PRIVATE_POOL &&
            drops == 3,
        "pool (0, 0) must fail and drop the context");
  CHECK(tessera_begin_allocate_to_pool(0, 9, 0, accept_all, nullptr, count_drop) == 0 && drops == 3,
        "a good begin must keep the context");
  CHECK(tessera_end_allocate_to_pool(0, 9, 0) == 0 && drops == 4, "the end must drop it once");
  CHECK(tessera_release_pool(0, 9, 0) == 0, "release failed");

  tessera_free(ordinary, 4 * kMiB, 0, kOther);
  CHECK(stats().allocated_bytes == 0, "allocations are left");
  CHECK(tessera_check_invariants(0) == 0, "an invariant is broken");
  std::printf("graph_hooks_test: OK (%d checks)\n", checks);
  return 0;
}
