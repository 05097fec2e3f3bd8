"""Python helpers for tessera, the CUDA caching allocator (libtessera.so).

``tessera`` itself needs only ctypes::

    import tessera
    lib = tessera.load()            # TESSERA_LIBRARY, else the one inside the package
    p = lib.malloc(1 << 20, device=0)
    print(lib.stats(0)["allocated_bytes"])
    lib.free(p)

``tessera.torch`` plugs it into PyTorch (``import tessera.torch as tt; tt.enable()``).
"""

from ._lib import (
    OOM_HOOK,
    PROTOTYPES,
    ErrorCode,
    InvalidLibraryError,
    Library,
    LibraryNotFoundError,
    LibraryVersionError,
    OomHook,
    Stats,
    TesseraError,
    __version__,
    candidate_paths,
    find_library,
    load,
)

__all__ = [
    "OOM_HOOK",
    "PROTOTYPES",
    "ErrorCode",
    "InvalidLibraryError",
    "Library",
    "LibraryNotFoundError",
    "LibraryVersionError",
    "OomHook",
    "Stats",
    "TesseraError",
    "__version__",
    "candidate_paths",
    "find_library",
    "load",
]
