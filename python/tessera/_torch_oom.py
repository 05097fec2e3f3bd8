"""A small C++ extension that makes tessera's out-of-memory failures raise
``torch.cuda.OutOfMemoryError`` instead of a plain ``RuntimeError``.

PyTorch calls a pluggable allocator's alloc function through a C++ ``std::function``; libtessera's
``tessera_torch_malloc`` throws ``std::runtime_error`` (libtessera does not depend on torch), which
PyTorch turns into ``RuntimeError``. This shim's ``tessera_torch_oom_malloc`` calls
``tessera_malloc`` and throws ``c10::OutOfMemoryError`` for an out-of-memory failure, which PyTorch
turns into ``torch.cuda.OutOfMemoryError`` (a ``RuntimeError`` subclass, so ``except
RuntimeError`` still catches it). It is built with ``torch.utils.cpp_extension.load_inline``
(needs a C++ compiler, ninja and torch's headers) once per torch version and source, into
``$XDG_CACHE_HOME/tessera`` (default ``~/.cache/tessera``), and imported from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from ._lib import Library

SOURCE = r"""
#include <c10/util/Exception.h>
#include <cstdint>
#include <string>

struct CUstream_st;
using malloc_fn = void *(*)(size_t, int, CUstream_st *);
using last_error_fn = const char *(*)();
using last_error_code_fn = int (*)();

static malloc_fn tessera_malloc = nullptr;
static last_error_fn tessera_last_error = nullptr;
static last_error_code_fn tessera_last_error_code = nullptr;
static constexpr int TESSERA_ERROR_OUT_OF_MEMORY = 1;

// PyTorch's alloc_fn: tessera_malloc, throwing c10::OutOfMemoryError for out of memory and
// c10::Error for any other failure (PyTorch maps them to torch.cuda.OutOfMemoryError and
// RuntimeError).
extern "C" void *tessera_torch_oom_malloc(size_t size, int device, CUstream_st *stream) {
  void *p = tessera_malloc(size, device, stream);
  if (p == nullptr && size != 0) {
    std::string message = tessera_last_error();  // copied before anything can overwrite it
    TORCH_CHECK_WITH(OutOfMemoryError, tessera_last_error_code() != TESSERA_ERROR_OUT_OF_MEMORY,
                     message);
    TORCH_CHECK(false, message);
  }
  return p;
}

// Points the shim at a loaded libtessera (function addresses from ctypes).
void bind(uint64_t malloc_addr, uint64_t last_error_addr, uint64_t last_error_code_addr) {
  tessera_malloc = reinterpret_cast<malloc_fn>(malloc_addr);
  tessera_last_error = reinterpret_cast<last_error_fn>(last_error_addr);
  tessera_last_error_code = reinterpret_cast<last_error_code_fn>(last_error_code_addr);
}

uint64_t alloc_address() { return reinterpret_cast<uint64_t>(&tessera_torch_oom_malloc); }

// Calls an alloc_fn (this shim's or tessera_torch_malloc) as PyTorch would, so that the exception
// it throws reaches Python through the same translation: used to check which type Python sees.
uint64_t probe(uint64_t alloc_addr, uint64_t size, int64_t device) {
  auto alloc = reinterpret_cast<malloc_fn>(alloc_addr);
  return reinterpret_cast<uint64_t>(alloc(size, static_cast<int>(device), nullptr));
}
"""

FUNCTIONS = ["bind", "alloc_address", "probe"]
NAME = "tessera_torch_oom_" + hashlib.sha256(SOURCE.encode()).hexdigest()[:12]

_module: Optional[ModuleType] = None


def build_directory() -> Path:
    """Where the shim is built and cached: one folder per torch version and Python version."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"torch-{torch.__version__}-{sys.implementation.cache_tag}"
    return cache / "tessera" / tag / NAME


def built_path() -> Path:
    """The shim's shared object, present once built."""
    return build_directory() / f"{NAME}.so"


def is_cached() -> bool:
    """Whether the shim is already built for this torch."""
    return built_path().is_file()


def missing_toolchain() -> Optional[str]:
    """Why the shim cannot be built here (None when it can)."""
    import torch.utils.cpp_extension as cpp_extension  # imports setuptools: only when building

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not on PATH (pip install ninja)"
    headers = [Path(p) / "c10" / "util" / "Exception.h" for p in cpp_extension.include_paths()]
    if not any(h.is_file() for h in headers):
        return "torch's C++ headers are not installed (c10/util/Exception.h)"
    return None


def load(library: Library) -> ModuleType:
    """The shim bound to ``library``: imported from the cache, else built (RuntimeError when
    the toolchain is missing or the build fails)."""
    global _module
    if _module is None:
        if is_cached():
            loader = importlib.machinery.ExtensionFileLoader(NAME, str(built_path()))
            spec = importlib.util.spec_from_loader(NAME, loader)
            assert spec is not None
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
        else:
            reason = missing_toolchain()
            if reason is not None:
                raise RuntimeError(f"cannot build tessera's torch.cuda.OutOfMemoryError shim: {reason}")
            # Built in a folder of its own, then renamed into place: another process never sees
            # a half-written shim (processes that race on a cold cache each build once).
            scratch = build_directory() / f"build-{os.getpid()}"
            scratch.mkdir(parents=True, exist_ok=True)
            print(
                f"tessera: building the torch.cuda.OutOfMemoryError shim into {build_directory()} "
                "(once per torch version; about half a minute)",
                file=sys.stderr,
            )
            import torch.utils.cpp_extension as cpp_extension

            try:
                module = cpp_extension.load_inline(
                    name=NAME,
                    cpp_sources=[SOURCE],
                    functions=FUNCTIONS,
                    build_directory=str(scratch),
                    extra_cflags=["-O2"],
                )
                os.replace(scratch / f"{NAME}.so", built_path())
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        _module = module
    _module.bind(
        library.address("tessera_malloc"),
        library.address("tessera_last_error"),
        library.address("tessera_last_error_code"),
    )
    return _module
