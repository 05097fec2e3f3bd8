// PyTorch's three CUDA-graph hooks for a pluggable allocator, with the C++ types PyTorch calls
// them with. torch/csrc/cuda/Module.cpp binds each setter as
//   using FuncType = void(int, c10::cuda::MempoolId_t, std::function<bool(cudaStream_t)>);
//   std::function<FuncType> func = reinterpret_cast<FuncType*>(func_ptr);
// so the address handed to set_begin_allocate_to_pool must be a function of exactly this type.
// Rust cannot write it (a std::function passed by value), so this file takes the filter over and
// hands tessera a context pointer plus call and drop functions; the other two hooks only unpack
// the pool id. Needs no CUDA or torch header: MempoolId_t is std::pair<unsigned long long,
// unsigned long long> and cudaStream_t is CUstream_st*, as declared in tessera.h.
//
// The functions have C linkage so that a loader finds them by name (dlsym, ctypes); their
// parameters keep their C++ types, and on the Itanium C++ ABI (Linux) linkage does not change
// how they are passed. A refused begin or end throws std::runtime_error with tessera's message,
// which PyTorch passes on to Python as a RuntimeError; a refused release is printed (see there).
#include <cstdio>
#include <functional>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#include "tessera.h"

namespace {

using MempoolId = std::pair<unsigned long long, unsigned long long>;
using Filter = std::function<bool(cudaStream_t)>;

// The filter may throw (PyTorch's checks cudaStreamGetCaptureInfo with AT_CUDA_CHECK): it runs
// inside tessera, which an exception must not cross, so a throwing filter means "not this pool".
bool call_filter(void *ctx, cudaStream_t stream) noexcept {
  try {
    return (*static_cast<Filter *>(ctx))(stream);
  } catch (...) {
    return false;
  }
}

void drop_filter(void *ctx) noexcept { delete static_cast<Filter *>(ctx); }

[[noreturn]] void refuse(const char *hook) {
  throw std::runtime_error(std::string("tessera: ") + hook + ": " + tessera_last_error());
}

}  // namespace

extern "C" void tessera_torch_begin_allocate_to_pool(int device, MempoolId id, Filter filter) {
  Filter *owned = new Filter(std::move(filter));
  // tessera owns `owned` from here on, and deletes it through drop_filter even on failure.
  if (tessera_begin_allocate_to_pool(device, id.first, id.second, call_filter, owned,
                                     drop_filter) != TESSERA_OK) {
    refuse("begin_allocate_to_pool");
  }
}

extern "C" void tessera_torch_end_allocate_to_pool(int device, MempoolId id) {
  if (tessera_end_allocate_to_pool(device, id.first, id.second) != TESSERA_OK) {
    refuse("end_allocate_to_pool");
  }
}

// PyTorch calls this one from CUDAGraph's destructor (through reset()), where a throw would end
// the process (std::terminate): a refusal is printed instead, and stays tessera's last error.
extern "C" void tessera_torch_release_pool(int device, MempoolId id) noexcept {
  if (tessera_release_pool(device, id.first, id.second) != TESSERA_OK) {
    std::fprintf(stderr, "tessera: release_pool: %s\n", tessera_last_error());
  }
}
