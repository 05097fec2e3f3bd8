// The one piece of C++ in libtessera.so: it throws the exception that tessera_torch_malloc raises on
// failure. PyTorch calls its allocator through a C++ std::function, so a std::runtime_error thrown
// here travels up through PyTorch to Python, which sees a RuntimeError whose message starts with
// "CUDA out of memory." for an out-of-memory failure. Needs no CUDA or torch header.
#include <stdexcept>
#include <string>

extern "C" [[noreturn]] void tessera_throw_runtime_error(const char *message) {
  // Copy the message before throwing: it lives in tessera's thread-local last error.
  throw std::runtime_error(std::string(message != nullptr ? message : "tessera: allocation failed"));
}
