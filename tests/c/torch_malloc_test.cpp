// torch_malloc_test.cpp: tessera_torch_malloc, the allocation entry point PyTorch's
// CUDAPluggableAllocator calls, throws a C++ std::runtime_error on failure instead of returning
// NULL. PyTorch turns that exception into a Python RuntimeError, so the message must start with
// "CUDA out of memory." for an OOM. This program checks that from C++, and that the library
// keeps working after every throw.
//
// Runs on the simulated device: TESSERA_DRIVER=sim, TESSERA_SIM=devices:2,capacity:64MiB,
// granularity:2MiB (ffi/tests/c_programs.rs sets both). Exits 1 with a message at the first
// failure; prints "torch_malloc_test: OK" on success.
//
// Build (one line): g++ -std=c++17 -Wall -Wextra -Werror -pedantic -O2 -pthread -Iinclude
//   tests/c/torch_malloc_test.cpp -Ltarget/debug -ltessera -Wl,-rpath,$PWD/target/debug
//   -o torch_malloc_test
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <typeinfo>

#include "tessera.h"

namespace {
constexpr const char *kProgram = "torch_malloc_test";
}  // namespace
#include "check.hpp"

namespace {

constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr std::size_t kCapacity = 64 * kMiB;  // TESSERA_SIM capacity
const auto kStream = reinterpret_cast<cudaStream_t>(std::uintptr_t{0x10});


bool starts_with(const std::string &s, const std::string &prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

tessera_stats stats(int device) {
  tessera_stats s{};
  s.size = sizeof s;
  int rc = tessera_get_stats(device, &s);
  CHECK(rc == 0, "tessera_get_stats(" + std::to_string(device) + ") returned " +
                     std::to_string(rc));
  return s;
}

// What a failing tessera_torch_malloc threw.
struct Thrown {
  bool threw = false;
  bool runtime_error = false;  // the exception is a std::runtime_error
  std::string what;
  void *returned = nullptr;    // what it returned when it did not throw
};

Thrown call(std::size_t size, int device) {
  Thrown t;
  try {
    t.returned = tessera_torch_malloc(size, device, kStream);
  } catch (std::exception const &e) {
    t.threw = true;
    t.runtime_error = dynamic_cast<std::runtime_error const *>(&e) != nullptr;
    t.what = e.what();
  } catch (...) {
    fail(__FILE__, __LINE__, "tessera_torch_malloc(" + std::to_string(size) + ", " +
                       std::to_string(device) +
                       ") threw something that is not a std::exception");
  }
  return t;
}

// A normal allocation works and can be written and freed: the library survived the throws.
void still_works(int device, const char *after) {
  tessera_stats before = stats(device);
  void *p = nullptr;
  try {
    p = tessera_torch_malloc(3 * kMiB, device, kStream);
  } catch (std::exception const &e) {
    fail(__FILE__, __LINE__, std::string("after ") + after + ": a 3 MiB allocation threw: " + e.what());
  }
  CHECK(p != nullptr, std::string("after ") + after + ": a 3 MiB allocation returned NULL");
  std::memset(p, 0x5A, 3 * kMiB);  // simulated device memory is host memory
  CHECK(static_cast<unsigned char *>(p)[3 * kMiB - 1] == 0x5A, "the allocation is not writable");
  tessera_stats mid = stats(device);
  CHECK(mid.allocated_bytes == before.allocated_bytes + 3 * kMiB &&
            mid.active_blocks == before.active_blocks + 1,
        std::string("after ") + after + ": the stats did not count the allocation");
  tessera_clear_last_error();
  tessera_free(p, 3 * kMiB, device, kStream);
  CHECK(tessera_last_error_code() == TESSERA_OK,
        std::string("after ") + after + ": freeing the allocation failed");
  tessera_stats end = stats(device);
  CHECK(end.allocated_bytes == before.allocated_bytes && end.active_blocks == before.active_blocks,
        std::string("after ") + after + ": the free did not count");
}

}  // namespace

int main() {
  const char *driver = std::getenv("TESSERA_DRIVER");
  if (driver == nullptr || std::strcmp(driver, "sim") != 0) {
    std::fprintf(stderr,
                 "torch_malloc_test: FAIL: run me with TESSERA_DRIVER=sim and "
                 "TESSERA_SIM=devices:2,capacity:64MiB,granularity:2MiB\n");
    return 1;
  }
  CHECK(tessera_device_count() == 2, "tessera_device_count() is not 2: check TESSERA_SIM");

  // 1. Above capacity: an OOM, thrown as std::runtime_error("CUDA out of memory. ...").
  tessera_stats before = stats(0);
  tessera_clear_last_error();
  Thrown oom = call(kCapacity + 2 * kMiB, 0);
  CHECK(oom.threw, "tessera_torch_malloc(66 MiB) on a 64 MiB device did not throw (returned " +
                       std::to_string(reinterpret_cast<std::uintptr_t>(oom.returned)) + ")");
  CHECK(oom.runtime_error, "the OOM exception is not a std::runtime_error: " + oom.what);
  CHECK(starts_with(oom.what, "CUDA out of memory."),
        "what() must start with \"CUDA out of memory.\"; it is \"" + oom.what + "\"");
  CHECK(oom.what.find("Tried to allocate 66.00 MiB") != std::string::npos,
        "the OOM message does not say what was asked for: \"" + oom.what + "\"");
  // The C side of the same failure: the thread's last error says the same thing.
  CHECK(tessera_last_error_code() == TESSERA_ERROR_OUT_OF_MEMORY,
        "after the OOM throw, tessera_last_error_code() is not TESSERA_ERROR_OUT_OF_MEMORY");
  CHECK(oom.what == tessera_last_error(), "what() differs from tessera_last_error()");
  tessera_stats after = stats(0);
  CHECK(after.ooms == before.ooms + 1, "the OOM was not counted in stats.ooms");
  CHECK(after.allocated_bytes == before.allocated_bytes, "a failed allocation changed the stats");

  // 2. The process keeps working: allocate, write, free.
  still_works(0, "an OOM throw");

  // 3. A bad device throws with the invalid-device message.
  for (int device : {99, -1, 2}) {
    Thrown bad = call(4096, device);
    CHECK(bad.threw, "tessera_torch_malloc on device " + std::to_string(device) +
                         " did not throw");
    CHECK(bad.runtime_error, "the invalid-device exception is not a std::runtime_error");
    CHECK(starts_with(bad.what, "invalid device " + std::to_string(device)),
          "device " + std::to_string(device) + ": what() = \"" + bad.what +
              "\", expected it to start with \"invalid device " + std::to_string(device) + "\"");
    CHECK(tessera_last_error_code() == TESSERA_ERROR_INVALID_DEVICE,
          "a bad device did not record TESSERA_ERROR_INVALID_DEVICE");
  }
  still_works(1, "invalid-device throws");

  // 4. Size 0: NULL, no throw, no error.
  tessera_clear_last_error();
  Thrown zero = call(0, 0);
  CHECK(!zero.threw, "tessera_torch_malloc(0) threw: " + zero.what);
  CHECK(zero.returned == nullptr, "tessera_torch_malloc(0) did not return NULL");
  CHECK(tessera_last_error_code() == TESSERA_OK, "tessera_torch_malloc(0) recorded an error");

  // 5. SIZE_MAX: an invalid size, thrown.
  Thrown huge = call(SIZE_MAX, 0);
  CHECK(huge.threw && huge.runtime_error, "tessera_torch_malloc(SIZE_MAX) did not throw");
  CHECK(tessera_last_error_code() == TESSERA_ERROR_INVALID_SIZE,
        "SIZE_MAX did not record TESSERA_ERROR_INVALID_SIZE: \"" + huge.what + "\"");

  // 6. Many throws, on this thread and another: nothing leaks into later calls or other threads.
  for (int i = 0; i < 200; i++) {
    Thrown t = call(kCapacity * 2, i % 2);
    CHECK(t.threw && starts_with(t.what, "CUDA out of memory."),
          "throw number " + std::to_string(i) + " was not an OOM: " + t.what);
  }
  std::string thread_problem;
  std::thread other([&thread_problem] {
    if (tessera_last_error_code() != TESSERA_OK) {
      thread_problem = "a new thread sees the main thread's last error";
      return;
    }
    for (int i = 0; i < 50; i++) {
      try {
        void *p = tessera_torch_malloc(kCapacity * 2, 1, kStream);
        thread_problem = "no throw on the second thread (returned " +
                         std::to_string(reinterpret_cast<std::uintptr_t>(p)) + ")";
        return;
      } catch (std::runtime_error const &e) {
        if (!starts_with(e.what(), "CUDA out of memory.")) {
          thread_problem = std::string("second thread: ") + e.what();
          return;
        }
      }
    }
  });
  other.join();
  CHECK(thread_problem.empty(), thread_problem);
  still_works(0, "250 throws on two threads");
  still_works(1, "250 throws on two threads");

  for (int d = 0; d < 2; d++) {
    tessera_stats s = stats(d);
    CHECK(s.active_blocks == 0 && s.allocated_bytes == 0,
          "device " + std::to_string(d) + " has live allocations at the end");
    CHECK(tessera_check_invariants(d) == 0, "check_invariants(" + std::to_string(d) + ")");
  }
  std::printf("torch_malloc_test: OK (%d checks)\n", checks);
  return 0;
}
