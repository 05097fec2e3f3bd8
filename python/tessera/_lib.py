"""ctypes bindings of libtessera.so (the C ABI in include/tessera.h), usable without torch.

Every C function gets its argtypes and restype here, and every failure becomes a
:class:`TesseraError` built from the calling thread's last error. The only Python code that C
calls is an OOM hook, and :meth:`Library.add_oom_hook` wraps it so that no exception crosses into
C.
"""

from __future__ import annotations

import ctypes
import enum
import json
import os
import pickle
import re
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

LIBRARY_NAME = "libtessera.so"
_PACKAGE_DIR = Path(__file__).resolve().parent


def _source_version() -> str:
    """The version of a source checkout: ``[workspace.package] version`` of the repository's
    Cargo.toml (``python/tessera`` lies two levels below it). A wheel carries it instead, in
    ``_build_version.py``, written from the same line by setup.py."""
    cargo = _PACKAGE_DIR.parents[1] / "Cargo.toml"
    try:
        text = cargo.read_text()
    except OSError as error:
        raise ImportError(
            f"tessera's version is unknown: the package has no _build_version.py (it was not "
            f"installed from a wheel) and {cargo} cannot be read ({error})"
        ) from None
    section = re.search(r"^\[workspace\.package\]$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = section and re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.M)
    if not found:
        raise ImportError(f"tessera's version is unknown: no [workspace.package] version in {cargo}")
    return found.group(1)


try:
    from ._build_version import VERSION as __version__
except ImportError:  # a source checkout (PYTHONPATH=python): no build step wrote the file
    __version__ = _source_version()


class ErrorCode(enum.IntEnum):
    """The TESSERA_* error codes of include/tessera.h."""

    OK = 0
    OUT_OF_MEMORY = 1
    INVALID_SIZE = 2
    INVALID_DEVICE = 3
    UNKNOWN_POINTER = 4
    DOUBLE_FREE = 5
    CONFIG = 6
    DRIVER = 7
    UNSUPPORTED = 8
    INVALID_ARGUMENT = 9
    INTERNAL = 10
    PRIVATE_POOL = 11


class TesseraError(RuntimeError):
    """A failed tessera call: ``code`` (an :class:`ErrorCode`, or the raw int if unknown) and
    ``message`` (tessera's last error message for the calling thread)."""

    def __init__(self, code: int, message: str) -> None:
        try:
            self.code: int = ErrorCode(code)
        except ValueError:
            self.code = code
        self.message = message
        name = self.code.name if isinstance(self.code, ErrorCode) else str(code)
        super().__init__(f"{message} [TESSERA_ERROR_{name}]")


class LibraryNotFoundError(FileNotFoundError):
    """No libtessera.so in any of the places :func:`find_library` looks."""


class InvalidLibraryError(OSError):
    """The file found is not a tessera library: it cannot be loaded, or lacks tessera's functions."""


class LibraryVersionError(InvalidLibraryError):
    """The tessera library is of another version than this Python package (``library_version``,
    ``package_version``)."""

    def __init__(self, message: str, library_version: str, package_version: str) -> None:
        super().__init__(message)
        self.library_version = library_version
        self.package_version = package_version


#: ``TESSERA_NO_LIMIT``: ``limit_bytes`` when no limit is in force.
NO_LIMIT = 2**64 - 1


class Stats(ctypes.Structure):
    """``struct tessera_stats``: every field a uint64_t, in the header's order."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "allocated_bytes",
            "peak_allocated_bytes",
            "requested_bytes",
            "peak_requested_bytes",
            "reserved_bytes",
            "peak_reserved_bytes",
            "active_blocks",
            "peak_active_blocks",
            "cached_free_bytes",
            "largest_free_bytes",
            "stranded_bytes",
            "segments",
            "mapped_pages",
            "pool_pages",
            "allocations",
            "frees",
            "allocated_bytes_total",
            "remaps",
            "cache_releases",
            "released_bytes",
            "hook_calls",
            "ooms",
            "invalid_frees",
            "driver_errors",
            "limit_bytes",
            "page_size",
            "alloc_retries",
            "capture_underway",
            "private_pools",
            "private_pool_held_bytes",
            "private_pool_allocated_bytes",
            "thread_cached_bytes",
        )
    ]


#: ``size_t (*tessera_oom_hook)(int device, size_t requested, void *user)``
OOM_HOOK = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p)

_size_t, _int, _void_p, _u64 = ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64
_stream = ctypes.c_void_p  # cudaStream_t

#: ``bool (*tessera_stream_filter)(void *ctx, cudaStream_t stream)``
STREAM_FILTER = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)
#: ``void (*tessera_filter_drop)(void *ctx)``
FILTER_DROP = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

#: The setters of ``torch._C._CUDAPluggableAllocator`` for CUDA graphs, each given the address of
#: a C++ function of libtessera.so (``tessera_torch_graph_hook``).
GRAPH_SETTERS = ("set_begin_allocate_to_pool", "set_end_allocate_to_pool_fn", "set_release_pool")

#: name -> (restype, argtypes) of every function in include/tessera.h.
PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "tessera_last_error": (ctypes.c_char_p, []),
    "tessera_last_error_code": (_int, []),
    "tessera_clear_last_error": (None, []),
    "tessera_version": (ctypes.c_char_p, []),
    "tessera_malloc": (_void_p, [_size_t, _int, _stream]),
    "tessera_torch_malloc": (_void_p, [_size_t, _int, _stream]),
    "tessera_free": (None, [_void_p, _size_t, _int, _stream]),
    "tessera_empty_cache": (_size_t, [_int]),
    "tessera_reset": (None, []),
    "tessera_set_memory_fraction": (None, [ctypes.c_double, _int]),
    "tessera_set_limit": (_int, [_int, _u64]),
    "tessera_record_stream": (None, [_void_p, _stream]),
    "tessera_base_alloc": (_void_p, [_void_p, ctypes.POINTER(_size_t)]),
    "tessera_init": (None, [_int]),
    "tessera_device_count": (_int, []),
    "tessera_get_stats": (_int, [_int, ctypes.POINTER(Stats)]),
    "tessera_reset_peak_stats": (_int, [_int]),
    "tessera_check_invariants": (_int, [_int]),
    "tessera_add_oom_hook": (_int, [OOM_HOOK, _void_p]),
    "tessera_remove_oom_hook": (_int, [_int]),
    "tessera_snapshot_json": (_size_t, [_int, ctypes.c_char_p, _size_t]),
    "tessera_memory_snapshot_pickle": (_size_t, [_int, ctypes.c_char_p, _size_t]),
    "tessera_configure": (_int, [ctypes.c_char_p]),
    "tessera_begin_allocate_to_pool": (_int, [_int, _u64, _u64, STREAM_FILTER, _void_p, FILTER_DROP]),
    "tessera_end_allocate_to_pool": (_int, [_int, _u64, _u64]),
    "tessera_release_pool": (_int, [_int, _u64, _u64]),
    "tessera_torch_graph_hook": (_void_p, [ctypes.c_char_p]),
}


def candidate_paths() -> list[Path]:
    """The places :func:`find_library` looks, in order (``TESSERA_LIBRARY`` excluded): inside the
    package (where the wheel puts it), then, for a source checkout (the package at
    ``REPO/python/tessera`` with ``REPO/Cargo.toml``), the repository's ``target/release`` and
    ``target/debug``. An installed package looks only inside itself."""
    paths = [_PACKAGE_DIR / LIBRARY_NAME]
    repo = _PACKAGE_DIR.parents[1]
    if _PACKAGE_DIR.parent.name == "python" and (repo / "Cargo.toml").is_file():
        paths += [repo / "target" / profile / LIBRARY_NAME for profile in ("release", "debug")]
    return paths


def find_library(path: Optional[str | os.PathLike[str]] = None) -> Path:
    """The libtessera.so to load: ``path`` if given, else ``$TESSERA_LIBRARY`` if set (either
    must exist; there is no fallback from them), else the first of :func:`candidate_paths` that
    exists. Raises :class:`LibraryNotFoundError` naming every place looked at."""
    explicit = path if path is not None else os.environ.get("TESSERA_LIBRARY") or None
    if explicit is not None:
        found = Path(explicit)
        if found.is_file():
            return found.resolve()
        origin = "the path given" if path is not None else "TESSERA_LIBRARY"
        raise LibraryNotFoundError(f"{LIBRARY_NAME} not found: {origin} names {found}, which is not a file")
    places = candidate_paths()
    for place in places:
        if place.is_file():
            return place.resolve()
    listed = "\n".join(f"  {p}" for p in ["$TESSERA_LIBRARY (not set)", *places])
    raise LibraryNotFoundError(
        f"{LIBRARY_NAME} not found; looked at:\n{listed}\n"
        "Install the package with the library inside it (`pip install .` in tessera's repository), "
        "build it (`cargo build --release -p tessera-ffi`), or set TESSERA_LIBRARY to its path."
    )


class OomHook:
    """A registered OOM hook (see :meth:`Library.add_oom_hook`). Calling it calls the wrapped
    function, so it can stand in for it after use as a decorator; :meth:`remove` unregisters it."""

    def __init__(self, library: Library, fn: Callable[[int, int], Optional[int]]) -> None:
        self.library = library
        self.__wrapped__ = fn
        self.id: Optional[int] = None
        # The ctypes callback must outlive its registration: C holds only its address.
        self._callback = OOM_HOOK(self._run)

    def _run(self, device: int, requested: int, _user: Optional[int]) -> int:
        """The C entry point: never lets an exception through (it is printed, and 0 returned)."""
        try:
            freed = self.__wrapped__(device, requested)
            return max(0, int(freed or 0))
        except BaseException:  # noqa: BLE001 - nothing may unwind into C
            print(f"tessera: OOM hook {self.__wrapped__!r} raised:", file=sys.stderr)
            traceback.print_exc()
            return 0

    def __call__(self, device: int, requested: int) -> Optional[int]:
        return self.__wrapped__(device, requested)

    def remove(self) -> None:
        """Unregisters the hook (a second call does nothing)."""
        if self.id is not None:
            self.library.remove_oom_hook(self.id)
            self.id = None

    def __repr__(self) -> str:
        return f"<tessera OomHook id={self.id} fn={self.__wrapped__!r}>"


class Library:
    """libtessera.so loaded with ctypes, one typed method per C function.

    Pointers are ints (0 for NULL), streams are ints or None (the default stream). Failures raise
    :class:`TesseraError`. The raw functions, with prototypes set, are on :attr:`cdll`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Loads the library at ``path`` and checks it is tessera's, of this package's version:
        :class:`InvalidLibraryError` when it cannot be loaded or lacks tessera's functions,
        :class:`LibraryVersionError` when its ``tessera_version()`` differs from ``__version__``."""
        self.path = Path(path)
        not_tessera = f"{self.path} is not a tessera library"
        try:
            self.cdll = ctypes.CDLL(str(self.path))
        except OSError as error:
            raise InvalidLibraryError(f"{self.path} cannot be loaded as a tessera library ({error})") from None
        if not hasattr(self.cdll, "tessera_version"):
            raise InvalidLibraryError(f"{not_tessera}: it has no tessera_version() function")
        version_fn = self.cdll.tessera_version
        version_fn.restype, version_fn.argtypes = ctypes.c_char_p, []
        version = (version_fn() or b"").decode("utf-8", "replace")
        if version != __version__:
            raise LibraryVersionError(
                f"{self.path} is tessera {version}, but this tessera Python package is "
                f"{__version__}: the two must be the same version. Reinstall the package (pip "
                f"install .), rebuild the library (cargo build --release -p tessera-ffi), or "
                f"point TESSERA_LIBRARY at a libtessera.so of version {__version__}.",
                version,
                __version__,
            )
        missing = [name for name in PROTOTYPES if not hasattr(self.cdll, name)]
        if missing:
            raise InvalidLibraryError(f"{not_tessera} {version}: it lacks {', '.join(missing)}")
        for name, (restype, argtypes) in PROTOTYPES.items():
            fn = getattr(self.cdll, name)
            fn.restype, fn.argtypes = restype, argtypes
        self._hooks: dict[int, OomHook] = {}
        # Python filters of open routes, by context id, until tessera drops them.
        self._filters: dict[int, Any] = {}
        self._next_filter = 1
        self._drop = FILTER_DROP(self._drop_filter)

    def __repr__(self) -> str:
        return f"<tessera.Library {self.path} version {self.version()}>"

    # Errors ---------------------------------------------------------------------------------

    def last_error(self) -> str:
        """This thread's last error message ("" if none)."""
        return (self.cdll.tessera_last_error() or b"").decode("utf-8", "replace")

    def last_error_code(self) -> int:
        """This thread's last error code (0 if none)."""
        return self.cdll.tessera_last_error_code()

    def clear_last_error(self) -> None:
        """Forgets this thread's last error."""
        self.cdll.tessera_clear_last_error()

    def _error(self, code: Optional[int] = None) -> TesseraError:
        return TesseraError(self.last_error_code() if code is None else code, self.last_error())

    def _call_checked(self, name: str, *args: Any) -> Any:
        """Calls a function whose return value cannot tell failure (void, or 0 that may be
        valid): clears the last error first and raises if the call recorded one."""
        self.clear_last_error()
        result = getattr(self.cdll, name)(*args)
        if self.last_error_code() != ErrorCode.OK:
            raise self._error()
        return result

    def _check_code(self, code: int) -> None:
        if code != ErrorCode.OK:
            raise self._error(code)

    def address(self, name: str) -> int:
        """The address of the C function ``name`` (for PyTorch's allocator hooks)."""
        address = ctypes.cast(getattr(self.cdll, name), ctypes.c_void_p).value
        assert address is not None
        return address

    # Functions ------------------------------------------------------------------------------

    def version(self) -> str:
        """The library's version, e.g. "0.1.0"."""
        return self.cdll.tessera_version().decode()

    def configure(self, conf: str) -> None:
        """``tessera_configure``: TESSERA_CONF syntax; must come before the first allocation."""
        self._check_code(self.cdll.tessera_configure(conf.encode()))

    def malloc(self, size: int, device: int = 0, stream: Optional[int] = None) -> int:
        """Allocates ``size`` bytes on ``device``; returns the pointer (0 for size 0)."""
        ptr = self.cdll.tessera_malloc(size, device, stream)
        if ptr is None:
            if size == 0:
                return 0
            raise self._error()
        return ptr

    def free(self, ptr: int, device: int = -1) -> None:
        """Frees ``ptr`` (0 does nothing); ``device`` -1 finds the device by pointer."""
        self._call_checked("tessera_free", ptr, 0, device, None)

    def empty_cache(self, device: int = -1) -> int:
        """Releases cached memory of ``device`` (-1: all) to the driver; returns the bytes."""
        return self._call_checked("tessera_empty_cache", device)

    def reset(self) -> None:
        """``tessera_reset``: empties every device's cache (PyTorch's reset_fn)."""
        self._call_checked("tessera_reset")

    def set_memory_fraction(self, fraction: float, device: int) -> None:
        """Limits ``device`` to ``fraction`` (in [0, 1], as PyTorch allows) of its memory."""
        self._call_checked("tessera_set_memory_fraction", fraction, device)

    def set_limit(self, device: int, limit_bytes: Optional[int]) -> None:
        """Limits the bytes ``device`` may reserve (0: no new memory); None removes the byte
        limit (a memory fraction stays: the smaller of the two is in force)."""
        limit = NO_LIMIT if limit_bytes is None else limit_bytes
        self._check_code(self.cdll.tessera_set_limit(device, limit))

    def record_stream(self, ptr: int, stream: Optional[int]) -> None:
        """Marks the allocation holding ``ptr`` as used on ``stream``."""
        self._call_checked("tessera_record_stream", ptr, stream)

    def base_alloc(self, ptr: int) -> tuple[int, int]:
        """The (base pointer, size) of the live allocation holding ``ptr``."""
        size = ctypes.c_size_t(0)
        base = self.cdll.tessera_base_alloc(ptr, ctypes.byref(size))
        if base is None:
            raise self._error()
        return base, size.value

    def init(self, device_count: int) -> None:
        """``tessera_init`` (PyTorch's init_fn): makes the allocator now."""
        self._call_checked("tessera_init", device_count)

    def device_count(self) -> int:
        """The number of devices tessera sees."""
        count = self.cdll.tessera_device_count()
        if count < 0:
            raise self._error()
        return count

    def get_stats(self, device: int = 0) -> Stats:
        """The raw ``tessera_stats`` of ``device``; ``.size`` says how many bytes were written."""
        out = Stats(size=ctypes.sizeof(Stats))
        self._check_code(self.cdll.tessera_get_stats(device, ctypes.byref(out)))
        return out

    def stats(self, device: int = 0) -> dict[str, Optional[int]]:
        """Every ``tessera_stats`` field the library wrote, by name (``size`` left out;
        ``limit_bytes`` is None when there is no limit)."""
        raw = self.get_stats(device)
        result: dict[str, Optional[int]] = {}
        for name, _ in Stats._fields_[1:]:
            if getattr(Stats, name).offset < raw.size:
                result[name] = getattr(raw, name)
        if result.get("limit_bytes") == NO_LIMIT:
            result["limit_bytes"] = None
        return result

    def reset_peak_stats(self, device: int = 0) -> None:
        """Restarts ``device``'s peak figures from the current ones."""
        self._check_code(self.cdll.tessera_reset_peak_stats(device))

    def check_invariants(self, device: int = 0) -> None:
        """Checks every invariant of ``device``'s pools (raises INTERNAL on a broken one)."""
        self._check_code(self.cdll.tessera_check_invariants(device))

    def snapshot_json(self, device: int = 0) -> str:
        """``device``'s snapshot as JSON text (see abi-spec: segments, blocks, stats)."""
        length = self._call_checked("tessera_snapshot_json", device, None, 0)
        while True:
            buf = ctypes.create_string_buffer(length + 1)
            needed = self._call_checked("tessera_snapshot_json", device, buf, len(buf))
            if needed <= length:  # it fitted (the state may change between the two calls)
                return buf.value.decode()
            length = needed

    def snapshot(self, device: int = 0) -> dict[str, Any]:
        """``device``'s snapshot, parsed."""
        return json.loads(self.snapshot_json(device))

    def memory_snapshot_pickle(self, device: int = -1) -> bytes:
        """The segments and blocks of ``device`` (-1: every device used) as the pickle PyTorch's
        ``torch.cuda.memory._dump_snapshot()`` writes (no allocation history)."""
        length = self._call_checked("tessera_memory_snapshot_pickle", device, None, 0)
        while True:
            buf = ctypes.create_string_buffer(length)
            needed = self._call_checked("tessera_memory_snapshot_pickle", device, buf, length)
            if needed <= length:  # it fitted (the state may change between the two calls)
                return buf.raw[:needed]
            length = needed

    def memory_snapshot(self, device: int = -1) -> dict[str, Any]:
        """:meth:`memory_snapshot_pickle`, unpickled: the dict ``torch.cuda.memory._snapshot()``
        returns. Only plain types are in it, and it comes from tessera's own writer."""
        return pickle.loads(self.memory_snapshot_pickle(device))

    # CUDA graphs -----------------------------------------------------------------------------

    def graph_hook_address(self, setter: str) -> int:
        """The address PyTorch's allocator setter ``setter`` (one of :data:`GRAPH_SETTERS`) takes:
        a C++ function with the hook's exact type (``tessera_torch_graph_hook``)."""
        address = self.cdll.tessera_torch_graph_hook(setter.encode())
        if address is None:
            raise self._error()
        return address

    def begin_allocate_to_pool(
        self, device: int, pool: tuple[int, int], accepts: Callable[[Optional[int]], bool]
    ) -> None:
        """Routes the allocations on ``device`` whose stream ``accepts(stream)`` says yes to
        (stream an int, or None for the default stream) to the private pool ``pool``, creating it
        or adding a use (PyTorch's ``beginAllocateToPool``), until :meth:`end_allocate_to_pool`.
        ``accepts`` runs with tessera's device lock held: it must not call tessera. An exception
        in it counts as no. It needs the GIL, taken inside tessera: no other thread may hold the
        GIL while it allocates on that device through a path that keeps the GIL (torch's
        allocations do), or the two wait on each other. PyTorch's graph hooks use C++ filters and
        have no such limit; this call is for tests and tools."""

        def call(_ctx: Optional[int], stream: Optional[int]) -> bool:
            try:
                return bool(accepts(stream))
            except BaseException:  # noqa: BLE001 - nothing may unwind into C
                return False

        callback = STREAM_FILTER(call)
        with _LOCK:
            ctx = self._next_filter
            self._next_filter += 1
            self._filters[ctx] = callback
        # tessera owns ctx from here: it calls _drop_filter on failure too.
        self._check_code(self.cdll.tessera_begin_allocate_to_pool(device, pool[0], pool[1], callback, ctx, self._drop))

    def _drop_filter(self, ctx: Optional[int]) -> None:
        with _LOCK:
            self._filters.pop(ctx or 0, None)

    def end_allocate_to_pool(self, device: int, pool: tuple[int, int]) -> None:
        """Stops routing to ``pool`` (PyTorch's ``endAllocateToPool``)."""
        self._check_code(self.cdll.tessera_end_allocate_to_pool(device, pool[0], pool[1]))

    def release_pool(self, device: int, pool: tuple[int, int]) -> None:
        """Drops a use of ``pool`` (PyTorch's ``releasePool``); at zero uses its memory joins the
        ordinary cache."""
        self._check_code(self.cdll.tessera_release_pool(device, pool[0], pool[1]))

    # OOM hooks -------------------------------------------------------------------------------

    def add_oom_hook(self, fn: Callable[[int, int], Optional[int]]) -> OomHook:
        """Registers ``fn(device, requested_bytes)`` to run when an allocation is about to fail;
        it may free memory (and return the bytes it freed, informational). An exception in it is
        printed with its traceback and the allocation goes on failing. Returns an
        :class:`OomHook` (callable like ``fn``; ``.remove()`` unregisters it)."""
        hook = OomHook(self, fn)
        with _LOCK:
            hook_id = self.cdll.tessera_add_oom_hook(hook._callback, None)
            if hook_id < 0:
                raise self._error()
            hook.id = hook_id
            self._hooks[hook_id] = hook
        return hook

    def remove_oom_hook(self, hook_id: int) -> None:
        """``tessera_remove_oom_hook``: unregisters a hook by id."""
        self._check_code(self.cdll.tessera_remove_oom_hook(hook_id))
        with _LOCK:
            self._hooks.pop(hook_id, None)


_LOCK = threading.Lock()
_LOADED: dict[Path, Library] = {}


def load(path: Optional[str | os.PathLike[str]] = None) -> Library:
    """Loads libtessera.so (found by :func:`find_library`) once per file and returns it."""
    found = find_library(path)
    with _LOCK:
        if found not in _LOADED:
            _LOADED[found] = Library(found)
        return _LOADED[found]
