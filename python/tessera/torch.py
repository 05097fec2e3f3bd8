"""tessera as PyTorch's CUDA allocator.

Enable it at the top of the script, before anything initialises CUDA::

    import torch
    import tessera.torch as tt

    tt.enable()                      # or tt.enable("limit:20GiB,page_size:2MiB")
    x = torch.empty(1 << 30, device="cuda")
    print(torch.cuda.memory_allocated(), tt.stats(0)["stranded_bytes"])

:func:`enable` swaps in ``torch.cuda.memory.CUDAPluggableAllocator`` over libtessera.so. Two
things raise for a pluggable allocator, and it makes them answer from tessera:
``torch.cuda.memory_stats()`` and its relatives, from tessera's statistics; and
``torch.cuda.memory._snapshot()`` (so ``_dump_snapshot()`` and ``torch.cuda.memory_snapshot()``),
from tessera's segments and blocks in PyTorch's format, which PyTorch's memory viewer opens.

CUDA graphs work: :func:`enable` also gives PyTorch tessera's three graph hooks, so
``torch.cuda.graph``, pools shared through ``pool=`` / ``graph_pool_handle()`` and
``make_graphed_callables`` capture into tessera's private pools. ``torch.compile`` with CUDA graphs
(``mode="reduce-overhead"``) runs them without CUDA-graph trees, whose allocator checkpoints
PyTorch's pluggable allocator does not forward (pytorch#163257); it warns once when it does so.
``torch.cuda.MemPool`` is not available (PyTorch does not forward ``createOrIncrefPool`` to a
pluggable allocator) and says so.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

try:
    import torch
except ImportError as _error:  # the `torch` extra: pip install 'tessera[torch]'
    raise ModuleNotFoundError(
        f"tessera.torch needs PyTorch, which cannot be imported ({_error}): install it with "
        "`pip install 'tessera[torch]'` (or any torch build); `import tessera` alone works without it",
        name="torch",
    ) from _error
import torch.cuda.memory as _memory

from . import _lib, _torch_oom
from ._lib import Library, OomHook

__all__ = [
    "State",
    "empty_cache",
    "enable",
    "is_enabled",
    "on_oom",
    "snapshot",
    "stats",
]

Device = Union[None, int, str, torch.device]
OomErrorMode = Literal["auto", "torch", "runtime"]

#: PyTorch allocator setter -> the tessera C function it gets. The CUDA-graph setters
#: (:data:`tessera._lib.GRAPH_SETTERS`) get C++ functions instead, from ``tessera_torch_graph_hook``.
HOOKS = {
    "set_init_fn": "tessera_init",
    "set_reset_fn": "tessera_reset",
    "set_memory_fraction_fn": "tessera_set_memory_fraction",
    "set_record_stream_fn": "tessera_record_stream",
    "set_base_alloc_fn": "tessera_base_alloc",
}

TOO_LATE = (
    "tessera must be enabled before CUDA is initialised (before the first CUDA tensor, "
    "torch.cuda.init() or any other call that initialises CUDA): PyTorch cannot swap its "
    "allocator once it is in use. Enable it at the top of the script, right after `import torch`:\n"
    "    import tessera.torch as tt\n"
    "    tt.enable()"
)


@dataclass(frozen=True)
class State:
    """What :func:`enable` set up."""

    library: Library
    #: The torch.cuda.memory allocator object now in use.
    allocator: _memory._CUDAAllocator
    #: The configuration given to enable (None: TESSERA_CONF or the defaults).
    conf: Optional[str]
    #: "torch" (OOM raises torch.cuda.OutOfMemoryError) or "runtime" (a plain RuntimeError).
    oom_error: str
    #: The PyTorch allocator hooks set, by setter name.
    hooks: tuple[str, ...]


_state: Optional[State] = None
_lock = threading.Lock()


def enable(conf: Optional[str] = None, *, oom_error: OomErrorMode = "auto") -> State:
    """Makes tessera PyTorch's CUDA allocator. Call it before CUDA is initialised.

    Finds libtessera.so (``$TESSERA_LIBRARY``, next to the package, or the repository's
    ``target/release`` then ``target/debug``), applies ``conf`` (``TESSERA_CONF`` syntax, e.g.
    ``"limit:20GiB"``) with ``tessera_configure``, creates the pluggable allocator with its init,
    reset (``torch.cuda.empty_cache``), memory-fraction, record-stream and base-alloc hooks and
    the three CUDA-graph hooks (private pools for ``torch.cuda.graph``), swaps it in, and patches
    ``torch.cuda.memory_stats`` and its relatives to answer from tessera, ``torch.compile`` to use
    CUDA graphs without trees, and ``torch.cuda.MemPool`` to say it is unavailable.

    ``oom_error`` picks what an out-of-memory failure raises: ``"torch"`` is
    ``torch.cuda.OutOfMemoryError`` (through a small C++ shim built once with
    ``torch.utils.cpp_extension``; needs a C++ compiler and ninja), ``"runtime"`` a plain
    ``RuntimeError`` (no build), ``"auto"`` the shim when it is cached or can be built, else
    ``"runtime"`` with a warning. Both messages start with ``CUDA out of memory.``.

    A second call returns the same :class:`State`; it raises if it asks for a different
    ``conf`` or ``oom_error``. Raises RuntimeError when CUDA is already initialised, and
    :class:`tessera.TesseraError` for a configuration tessera rejects.
    """
    global _state
    if oom_error not in ("auto", "torch", "runtime"):
        raise ValueError(f"oom_error must be 'auto', 'torch' or 'runtime', not {oom_error!r}")
    with _lock:
        if _state is not None:
            if conf is not None and conf != _state.conf:
                raise RuntimeError(
                    f"tessera is already enabled with conf={_state.conf!r}; it cannot be "
                    f"reconfigured to {conf!r} (the allocator is in use)"
                )
            if oom_error != "auto" and oom_error != _state.oom_error:
                raise RuntimeError(f"tessera is already enabled with oom_error={_state.oom_error!r}")
            return _state
        if torch.cuda.is_initialized():
            raise RuntimeError(TOO_LATE)
        library = _lib.load()
        if conf is not None:
            library.configure(conf)
        allocator, mode = _make_allocator(library, oom_error)
        hooks = wire_hooks(allocator.allocator(), library)
        try:
            _memory.change_current_allocator(allocator)
        except RuntimeError as e:  # "Can't swap an already initialized allocator"
            raise RuntimeError(f"{TOO_LATE}\n(PyTorch: {e})") from e
        _patch_torch()
        _state = State(library, allocator, conf, mode, hooks)
        return _state


def is_enabled() -> bool:
    """Whether :func:`enable` has made tessera PyTorch's allocator in this process."""
    return _state is not None


def _make_allocator(library: Library, oom_error: OomErrorMode) -> tuple[_memory._CUDAAllocator, str]:
    """The allocator object for ``oom_error`` and the mode it ended up with."""
    if oom_error != "runtime":
        try:
            shim = _torch_oom.load(library)
        except Exception as e:  # noqa: BLE001 - any build failure falls back in "auto"
            if oom_error == "torch":
                raise
            warnings.warn(
                f"tessera: out-of-memory errors will raise RuntimeError, not "
                f"torch.cuda.OutOfMemoryError ({e}). Pass oom_error='runtime' to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            raw = torch._C._cuda_customAllocator(shim.alloc_address(), library.address("tessera_free"))
            return _memory._CUDAAllocator(raw), "torch"
    plug = _memory.CUDAPluggableAllocator(os.fspath(library.path), "tessera_torch_malloc", "tessera_free")
    return plug, "runtime"


def wire_hooks(raw_allocator: Any, library: Library) -> tuple[str, ...]:
    """Gives every hook in :data:`HOOKS` and the three CUDA-graph hooks to a
    ``torch._C._CUDAPluggableAllocator`` (each setter takes the function's address); returns the
    setters called."""
    for setter, function in HOOKS.items():
        getattr(raw_allocator, setter)(library.address(function))
    for setter in _lib.GRAPH_SETTERS:
        getattr(raw_allocator, setter)(library.graph_hook_address(setter))
    return (*HOOKS, *_lib.GRAPH_SETTERS)


def _library() -> Library:
    return _state.library if _state is not None else _lib.load()


def device_index(device: Device = None) -> int:
    """The CUDA device index of ``device`` (None, an int, "cuda:N" or a torch.device). None and
    a device without index mean the current device once CUDA is initialised, else 0."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    if isinstance(device, int):
        return device
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"expected a CUDA device, got {dev}")
    return device_index(None) if dev.index is None else dev.index


# tessera's own view -------------------------------------------------------------------------


def stats(device: Device = 0) -> dict[str, Optional[int]]:
    """Every ``tessera_stats`` field of ``device`` by its C name (``limit_bytes`` None when there
    is no limit)."""
    return _library().stats(device_index(device))


def snapshot(device: Device = 0) -> dict[str, Any]:
    """``device``'s segments, blocks and stats (tessera's snapshot JSON, parsed)."""
    return _library().snapshot(device_index(device))


def empty_cache(device: Union[int, str, torch.device] = -1) -> int:
    """Releases ``device``'s (-1: every device's) cached memory to the driver; returns the bytes
    released."""
    return _library().empty_cache(device if device == -1 else device_index(device))


def on_oom(fn: Callable[[int, int], Optional[int]]) -> OomHook:
    """Registers ``fn(device, requested_bytes)`` to run when an allocation is about to fail, after
    tessera released its cache and before it gives up; it may drop tensors (or other memory) and
    tessera then retries. An exception in ``fn`` is printed with its traceback and the allocation
    fails as it would have. Returns a handle that calls ``fn`` and has ``.remove()``; works as a
    decorator::

        @tt.on_oom
        def drop_cache(device, requested):
            kv_cache.clear()
    """
    return _library().add_oom_hook(fn)


# torch.cuda.memory_stats and its relatives, answered from tessera -----------------------------

#: Per device: the cumulative counters at the last reset_accumulated_memory_stats().
_baselines: dict[int, dict[str, int]] = {}


def _cumulative(s: dict[str, Optional[int]]) -> dict[str, int]:
    """The cumulative figures behind PyTorch's "allocated"/"freed" keys and num_ooms."""
    get = lambda key: s.get(key) or 0  # noqa: E731
    return {
        "allocated_bytes": get("allocated_bytes_total"),
        "freed_bytes": get("allocated_bytes_total") - get("allocated_bytes"),
        "reserved_bytes": get("reserved_bytes") + get("released_bytes"),
        "released_bytes": get("released_bytes"),
        "allocations": get("allocations"),
        "frees": get("frees"),
        "ooms": get("ooms"),
        "alloc_retries": get("alloc_retries"),
    }


def _stat(current: int, peak: int, allocated: int, freed: int) -> dict[str, int]:
    return {"current": current, "peak": peak, "allocated": allocated, "freed": freed}


def _pools(all_: dict[str, int]) -> dict[str, dict[str, int]]:
    """tessera's stats have no large/small split: everything is in large_pool, small_pool is 0."""
    return {"all": all_, "large_pool": dict(all_), "small_pool": _stat(0, 0, 0, 0)}


def memory_stats_as_nested_dict(device: Device = None) -> dict[str, Any]:
    """tessera's statistics under PyTorch's ``torch.cuda.memory_stats_as_nested_dict`` keys
    (see python/README.md for the mapping), plus tessera's own figures under ``tessera``."""
    dev = device_index(device)
    s = _library().stats(dev)
    get = lambda key: s.get(key) or 0  # noqa: E731
    base = _baselines.get(dev, {})
    c = {key: value - base.get(key, 0) for key, value in _cumulative(s).items()}
    allocated = _stat(get("allocated_bytes"), get("peak_allocated_bytes"), c["allocated_bytes"], c["freed_bytes"])
    blocks = _stat(get("active_blocks"), get("peak_active_blocks"), c["allocations"], c["frees"])
    return {
        "allocated_bytes": _pools(allocated),
        "active_bytes": _pools(dict(allocated)),
        "requested_bytes": _pools(_stat(get("requested_bytes"), get("peak_requested_bytes"), 0, 0)),
        "reserved_bytes": _pools(
            _stat(get("reserved_bytes"), get("peak_reserved_bytes"), c["reserved_bytes"], c["released_bytes"])
        ),
        "allocation": _pools(blocks),
        "active": _pools(dict(blocks)),
        "segment": _pools(_stat(get("segments"), 0, 0, 0)),
        "inactive_split_bytes": _pools(_stat(get("stranded_bytes"), 0, 0, 0)),
        "inactive_split": _pools(_stat(0, 0, 0, 0)),
        "oversize_allocations": _stat(0, 0, 0, 0),
        "oversize_segments": _stat(0, 0, 0, 0),
        "num_ooms": c["ooms"],
        "num_alloc_retries": c["alloc_retries"],
        "tessera": {
            key: get(key)
            for key in (
                "stranded_bytes",
                "largest_free_bytes",
                "cached_free_bytes",
                "thread_cached_bytes",
                "remaps",
                "page_size",
                "invalid_frees",
                "driver_errors",
                "cache_releases",
                "hook_calls",
                "mapped_pages",
                "pool_pages",
                "capture_underway",
                "private_pools",
                "private_pool_held_bytes",
                "private_pool_allocated_bytes",
            )
        }
        # -1: no limit (0 is a real one: no new memory).
        | {"limit_bytes": -1 if s.get("limit_bytes") is None else s["limit_bytes"]},
    }


def _flatten(prefix: str, obj: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else key, value, out)
    else:
        out.append((prefix, obj))


def memory_stats(device: Device = None) -> collections.OrderedDict[str, Any]:
    """``torch.cuda.memory_stats`` from tessera: the nested dict flattened to dotted keys, sorted."""
    out: list[tuple[str, Any]] = []
    _flatten("", memory_stats_as_nested_dict(device), out)
    return collections.OrderedDict(sorted(out))


def memory_allocated(device: Device = None) -> int:
    """Bytes in live allocations (tessera's rounded sizes)."""
    return memory_stats(device)["allocated_bytes.all.current"]


def max_memory_allocated(device: Device = None) -> int:
    """Peak of :func:`memory_allocated` since the start or the last peak reset."""
    return memory_stats(device)["allocated_bytes.all.peak"]


def memory_reserved(device: Device = None) -> int:
    """Bytes tessera holds from the driver."""
    return memory_stats(device)["reserved_bytes.all.current"]


def max_memory_reserved(device: Device = None) -> int:
    """Peak of :func:`memory_reserved` since the start or the last peak reset."""
    return memory_stats(device)["reserved_bytes.all.peak"]


def reset_peak_memory_stats(device: Device = None) -> None:
    """Restarts every peak figure of the device from its current value (tessera_reset_peak_stats)."""
    _library().reset_peak_stats(device_index(device))


def reset_max_memory_allocated(device: Device = None) -> None:
    """As in PyTorch, resets every peak figure (:func:`reset_peak_memory_stats`)."""
    reset_peak_memory_stats(device)


def reset_max_memory_cached(device: Device = None) -> None:
    """As in PyTorch, resets every peak figure (:func:`reset_peak_memory_stats`)."""
    reset_peak_memory_stats(device)


def reset_accumulated_memory_stats(device: Device = None) -> None:
    """Restarts the "allocated"/"freed" keys and num_ooms from 0 (tessera's counters go on; the
    baseline is kept here, per device)."""
    dev = device_index(device)
    _baselines[dev] = _cumulative(_library().stats(dev))


_torch_memory_summary = _memory.memory_summary


def memory_summary(device: Device = None, abbreviated: bool = False) -> str:
    """PyTorch's ``memory_summary`` table over tessera's statistics."""
    text = _torch_memory_summary(device_index(device), abbreviated)
    return text.replace("PyTorch CUDA memory summary", "tessera CUDA memory summary", 1)


def _snapshot(device: Device = None, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``torch.cuda.memory._snapshot`` from tessera: the segments and blocks of every device
    tessera has used, in PyTorch's snapshot format, which ``_dump_snapshot`` pickles and PyTorch's
    memory viewer opens. ``device_traces`` are empty: tessera records no allocation history (use
    ``TESSERA_TRACE`` and ``tessera replay --export`` for one). As in PyTorch, ``device`` is
    ignored, and so are the arguments later versions add (``augment_with_fx_traces``, ...)."""
    del device, args, kwargs
    return _library().memory_snapshot(-1)


def memory_snapshot(mempool_id: Any = None, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """``torch.cuda.memory_snapshot`` from tessera: the segments of :func:`_snapshot`; with a
    ``mempool_id`` (a graph pool's id), only the segments of that private pool, as in PyTorch.
    ``include_traces`` and later arguments are accepted and ignored."""
    del args, kwargs
    segments = _snapshot()["segments"]
    if mempool_id is None:
        return segments
    wanted = tuple(int(x) for x in mempool_id)
    return [s for s in segments if tuple(s["segment_pool_id"]) == wanted]


_PATCHED = {
    fn.__name__: fn
    for fn in (
        memory_stats,
        memory_stats_as_nested_dict,
        memory_allocated,
        max_memory_allocated,
        memory_reserved,
        max_memory_reserved,
        reset_peak_memory_stats,
        reset_accumulated_memory_stats,
        reset_max_memory_allocated,
        reset_max_memory_cached,
        memory_summary,
        _snapshot,
        memory_snapshot,
    )
}


#: Inductor modes that capture CUDA graphs.
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
_ORIGINAL_COMPILE = torch.compile
_warned_trees = False

NO_CUDAGRAPH_TREES = (
    "tessera: torch.compile will capture CUDA graphs without CUDA-graph trees "
    "(torch._inductor.config.triton.cudagraph_trees = False): the trees checkpoint and restore "
    "the allocator's pool state through functions PyTorch's pluggable allocator does not forward "
    "(pytorch#163257). Each compiled graph is then captured into a pool of its own."
)


def _uses_cudagraphs(mode: Optional[str], options: dict[str, Any]) -> bool:
    import torch._inductor.config as inductor_config

    return (
        mode in _CUDAGRAPH_MODES
        or bool(options.get("triton.cudagraphs"))
        or bool(inductor_config.triton.cudagraphs)
    )


def _compile(*args: Any, **kwargs: Any) -> Any:
    """``torch.compile`` under tessera: the same, with CUDA-graph trees off (see
    :data:`NO_CUDAGRAPH_TREES`) and a warning the first time a compile asks for CUDA graphs."""
    global _warned_trees
    if kwargs.get("backend") == "cudagraphs":
        warnings.warn(
            "tessera: torch.compile(backend='cudagraphs') always uses CUDA-graph trees, which "
            "PyTorch's pluggable allocator cannot serve (pytorch#163257); use "
            "mode='reduce-overhead' with the default backend instead",
            RuntimeWarning,
            stacklevel=2,
        )
    elif kwargs.get("backend") in (None, "inductor") and not kwargs.get("disable", False):
        import torch._inductor.config as inductor_config

        options = dict(kwargs.get("options") or {})
        if options.pop("triton.cudagraph_trees", False):
            # Asked for by name: it cannot work under tessera; go on without, and say so.
            kwargs["options"] = options
            _warned_trees = False
        inductor_config.triton.cudagraph_trees = False
        if not _warned_trees and _uses_cudagraphs(kwargs.get("mode"), options):
            _warned_trees = True
            warnings.warn(NO_CUDAGRAPH_TREES, RuntimeWarning, stacklevel=2)
    return _ORIGINAL_COMPILE(*args, **kwargs)


MEMPOOL_UNAVAILABLE = (
    "tessera: torch.cuda.MemPool is not available while tessera is PyTorch's allocator: PyTorch's "
    "pluggable allocator does not forward createOrIncrefPool, which MemPool needs. CUDA graphs "
    "do work: share a pool between graphs with torch.cuda.graph_pool_handle() (pool=...)."
)

_ORIGINAL_MEMPOOL_INIT = getattr(getattr(torch.cuda, "MemPool", None), "__init__", None)


def _mempool_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """``torch.cuda.MemPool.__init__``, with PyTorch's internal error for a pluggable allocator
    replaced by one that says why and what works instead."""
    assert _ORIGINAL_MEMPOOL_INIT is not None
    try:
        _ORIGINAL_MEMPOOL_INIT(self, *args, **kwargs)
    except RuntimeError as e:
        if "createOrIncrefPool" in str(e):
            raise RuntimeError(f"{MEMPOOL_UNAVAILABLE}\n(PyTorch: {e})") from e
        raise


def _patch_torch() -> None:
    """Replaces the stats functions in ``torch.cuda.memory`` and their re-exports in
    ``torch.cuda`` (torch's memory_cached/max_memory_cached call the patched ones),
    ``torch.compile`` (CUDA graphs without trees) and ``torch.cuda.MemPool.__init__`` (a clear
    error)."""
    for module in (_memory, torch.cuda):
        for name, fn in _PATCHED.items():
            if hasattr(module, name):
                setattr(module, name, fn)
    torch.compile = _compile  # type: ignore[assignment]
    if "torch._inductor.config" in sys.modules:
        sys.modules["torch._inductor.config"].triton.cudagraph_trees = False
    mempool = getattr(torch.cuda, "MemPool", None)
    if mempool is not None and _ORIGINAL_MEMPOOL_INIT is not None:
        mempool.__init__ = _mempool_init
