"""tessera.torch with PyTorch installed, on the simulated driver and without a GPU: CUDA is never
initialised, so the allocator swap works and the patched statistics are checked against
allocations made through the ctypes Library (the same process-wide allocator PyTorch would use)."""

from __future__ import annotations

import ctypes
import threading
import warnings

import pytest
from support import GiB, MiB, check, import_torch, missing_requirement, run_python

torch = import_torch()

import tessera  # noqa: E402
import tessera.torch as tt  # noqa: E402
from tessera import _torch_oom  # noqa: E402

DEV = 1


@pytest.fixture(scope="module")
def state(lib: tessera.Library) -> tt.State:
    return tt.enable(oom_error="runtime")


@pytest.fixture(scope="module")
def shim(lib: tessera.Library):
    """The OutOfMemoryError shim, built (about half a minute, once) or taken from the cache."""
    if not _torch_oom.is_cached():
        reason = _torch_oom.missing_toolchain()
        if reason is not None:
            missing_requirement(f"the shim cannot be built: {reason}")
    return _torch_oom.load(lib)


# enable() ------------------------------------------------------------------------------------


def test_enable_swaps_in_the_pluggable_allocator(state, lib):
    assert tt.is_enabled() and state.library is lib
    assert state.oom_error == "runtime" and state.conf is None
    assert isinstance(state.allocator, torch.cuda.memory.CUDAPluggableAllocator)
    assert torch.cuda.memory._get_current_allocator().allocator() is state.allocator.allocator()
    assert state.hooks == (*tt.HOOKS, *tessera._lib.GRAPH_SETTERS)
    assert not torch.cuda.is_initialized()


def test_enable_again_returns_the_same_state(state):
    assert tt.enable() is state
    assert tt.enable(None, oom_error="runtime") is state
    with pytest.raises(RuntimeError, match="already enabled with conf=None"):
        tt.enable("limit:1GiB")
    with pytest.raises(RuntimeError, match="already enabled with oom_error='runtime'"):
        tt.enable(oom_error="torch")
    with pytest.raises(ValueError, match="oom_error"):
        tt.enable(oom_error="never")  # type: ignore[arg-type]


def test_every_hook_is_wired_with_its_address(state, lib):
    calls: list[tuple[str, int]] = []

    class Recorder:
        def __getattr__(self, setter):
            return lambda address: calls.append((setter, address))

    graph_setters = ("set_begin_allocate_to_pool", "set_end_allocate_to_pool_fn", "set_release_pool")
    assert tessera._lib.GRAPH_SETTERS == graph_setters
    assert tt.wire_hooks(Recorder(), lib) == (*tt.HOOKS, *graph_setters) == state.hooks
    expected = {setter: lib.address(fn) for setter, fn in tt.HOOKS.items()}
    expected.update({setter: lib.graph_hook_address(setter) for setter in graph_setters})
    assert dict(calls) == expected
    real = type(state.allocator.allocator())
    assert all(hasattr(real, setter) for setter in expected)


def test_enable_too_late_says_how_to_fix_it():
    out = check(
        run_python(
            """
            import torch, tessera, tessera.torch as tt
            torch.cuda.is_initialized = lambda: True
            try:
                tt.enable("limit:64MiB")
            except RuntimeError as e:
                print("ERROR:", e)
            print("enabled:", tt.is_enabled())
            tessera.load().configure("limit:32MiB")  # enable() changed nothing
            print("limit:", tessera.load().stats(0)["limit_bytes"])
            """
        )
    )
    assert "ERROR: tessera must be enabled before CUDA is initialised" in out
    assert "first CUDA tensor" in out and "tt.enable()" in out
    assert "enabled: False" in out and f"limit: {32 * MiB}" in out


def test_enable_without_a_library_names_every_place_it_looked(tmp_path):
    empty = tmp_path / "site-packages" / "tessera"
    empty.mkdir(parents=True)
    out = check(
        run_python(
            f"""
            import pathlib, tessera, tessera.torch as tt
            tessera._lib._PACKAGE_DIR = pathlib.Path({str(empty)!r})  # a package without its library
            try:
                tt.enable()
            except tessera.LibraryNotFoundError as e:
                print("ERROR:", e)
            print("enabled:", tt.is_enabled())
            """,
            {"TESSERA_LIBRARY": None},
        )
    )
    assert "ERROR: libtessera.so not found; looked at:" in out
    assert "$TESSERA_LIBRARY (not set)" in out and str(empty / "libtessera.so") in out
    assert "pip install ." in out and "enabled: False" in out


def test_enable_with_tessera_library_naming_another_file_says_it_is_not_tessera(tmp_path):
    bogus = tmp_path / "libtessera.so"
    bogus.write_text("#!/bin/sh\n")
    out = check(
        run_python(
            """
            import tessera, tessera.torch as tt
            try:
                tt.enable()
            except tessera.InvalidLibraryError as e:
                print("ERROR:", type(e).__name__, e)
            """,
            {"TESSERA_LIBRARY": str(bogus)},
        )
    )
    assert f"ERROR: InvalidLibraryError {bogus} cannot be loaded as a tessera library" in out
    assert "Traceback" not in out


def test_enable_applies_conf_and_reports_a_bad_one():
    out = check(
        run_python(
            """
            import torch, tessera, tessera.torch as tt
            try:
                tt.enable("limit:12XB", oom_error="runtime")
            except tessera.TesseraError as e:
                print("ERROR:", e.code.name, tt.is_enabled())
            state = tt.enable("limit:64MiB", oom_error="runtime")
            print("limit:", tt.stats(0)["limit_bytes"], state.conf)
            """
        )
    )
    assert "ERROR: CONFIG False" in out and f"limit: {64 * MiB} limit:64MiB" in out


def test_auto_falls_back_to_runtime_error_with_a_warning(tmp_path):
    out = check(
        run_python(
            """
            import warnings, torch, tessera.torch as tt
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                state = tt.enable()
            print("mode:", state.oom_error, type(state.allocator).__name__)
            print("warnings:", [str(w.message) for w in caught if w.category is RuntimeWarning])
            try:
                tt.enable(oom_error="torch")
            except RuntimeError as e:
                print("ERROR:", e)
            """,
            {"CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path)},
        )
    )
    assert "mode: runtime CUDAPluggableAllocator" in out
    assert "torch.cuda.OutOfMemoryError" in out and "no C++ compiler" in out
    assert "ERROR: tessera is already enabled with oom_error='runtime'" in out


def test_torch_mode_uses_the_shim(shim, tmp_path):
    out = check(
        run_python(
            """
            import warnings, torch, tessera.torch as tt
            warnings.simplefilter("error")
            state = tt.enable()  # auto: the shim is cached
            print("mode:", state.oom_error, type(state.allocator).__name__)
            current = torch.cuda.memory._get_current_allocator().allocator()
            print("current:", current is state.allocator.allocator())
            """
        )
    )
    assert "mode: torch _CUDAAllocator" in out and "current: True" in out
    refused = run_python(
        "import torch, tessera.torch as tt; tt.enable(oom_error='torch')",
        {"CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path)},
    )
    assert refused.returncode != 0 and "cannot build tessera's torch.cuda.OutOfMemoryError shim" in refused.stderr


def test_oom_shim_raises_torch_out_of_memory_error(shim, lib):
    alloc = shim.alloc_address()
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"^CUDA out of memory\. Tried to allocate 2\.00 GiB"):
        shim.probe(alloc, 2 * GiB, 0)  # more than the simulated device holds
    with pytest.raises(RuntimeError, match="invalid device 99") as other:
        shim.probe(alloc, MiB, 99)
    assert not isinstance(other.value, torch.cuda.OutOfMemoryError)
    with pytest.raises(RuntimeError, match=r"^CUDA out of memory\.") as plain:
        shim.probe(lib.address("tessera_torch_malloc"), 2 * GiB, 0)
    assert not isinstance(plain.value, torch.cuda.OutOfMemoryError)
    p = shim.probe(alloc, MiB, 0)
    assert lib.base_alloc(p) == (p, MiB)
    lib.free(p, 0)
    assert shim.probe(alloc, 0, 0) == 0


# torch.cuda statistics from tessera --------------------------------------------------------


def test_stats_functions_are_patched_in_both_modules(state):
    for name in (
        "memory_stats",
        "memory_stats_as_nested_dict",
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
        "reset_peak_memory_stats",
        "reset_accumulated_memory_stats",
        "reset_max_memory_allocated",
        "reset_max_memory_cached",
        "memory_summary",
    ):
        assert getattr(torch.cuda, name) is getattr(tt, name), name
        assert getattr(torch.cuda.memory, name) is getattr(tt, name), name


# CUDA graphs: PyTorch's own C++ calls reach tessera's hooks ----------------------------------
#
# torch.cuda.graph calls c10::cuda::CUDACachingAllocator::beginAllocateToPool (capture_begin),
# endAllocateToPool (capture_end) and releasePool (graph reset). These torch._C functions make
# the same calls, with PyTorch's own std::function filters, and need no GPU: they go through
# CUDAPluggableAllocator to the hooks enable() set, exactly as a capture would.


def _pool_of(lib, ptr):
    blocks = (b for s in lib.snapshot(DEV)["segments"] for b in s["blocks"])
    return next(b["pool"] for b in blocks if b["address"] == ptr)


def _private_pools(device=DEV):
    return {tuple(p["id"]): p for p in tt.snapshot(device)["stats"]["private_pools"]}


def test_pytorch_routes_a_threads_allocations_to_a_private_pool_through_the_hooks(state, lib):
    pool = (41, 0)
    # PyTorch's filter here: "allocations of this thread" (std::this_thread::get_id() == tid).
    torch._C._cuda_beginAllocateCurrentThreadToPool(DEV, pool)
    try:
        mine = lib.malloc(2 * MiB, DEV)
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("p", lib.malloc(2 * MiB, DEV)))
        t.start()
        t.join()
        assert _pool_of(lib, mine) == [41, 0]
        assert _pool_of(lib, box["p"]) is None, "another thread's allocation stays ordinary"
        p = _private_pools()[pool]
        assert p["uses"] == 1 and p["routed"] and p["allocated_bytes"] == 2 * MiB
        assert tt.stats(DEV)["capture_underway"] == 1
        ms = torch.cuda.memory_stats(DEV)
        assert ms["tessera.private_pools"] == 1 and ms["tessera.capture_underway"] == 1
        assert ms["tessera.private_pool_allocated_bytes"] == 2 * MiB
        # torch.cuda.memory_snapshot(mempool_id) lists the pool's segments only.
        segs = tt.memory_snapshot(pool)
        assert segs and all(tuple(s["segment_pool_id"]) == pool for s in segs)
        assert any(b["address"] == mine for s in segs for b in s["blocks"])
        assert not any(b["address"] == box["p"] for s in segs for b in s["blocks"])
    finally:
        torch._C._cuda_endAllocateToPool(DEV, pool)
    assert tt.stats(DEV)["capture_underway"] == 0 and not _private_pools()[pool]["routed"]
    lib.free(mine, DEV)
    torch._C._cuda_releasePool(DEV, pool)
    assert _private_pools()[pool]["uses"] == 0, "released: private until the device is idle"
    lib.free(box["p"], DEV)
    tt.empty_cache(DEV)  # synchronizes the device and drains the pool
    assert pool not in _private_pools()
    assert tt.stats(DEV)["reserved_bytes"] == 0


def test_graphs_sharing_a_pool_handle_add_uses(state, lib):
    # graph_pool_handle() is what torch.cuda.graph(pool=...) shares; it needs no GPU.
    handle = torch.cuda.graph_pool_handle()
    assert not torch.cuda.is_initialized()
    for _ in range(2):
        torch._C._cuda_beginAllocateToPool(DEV, handle)
        p = lib.malloc(MiB, DEV)
        lib.free(p, DEV)
        torch._C._cuda_endAllocateToPool(DEV, handle)
    assert _private_pools()[tuple(handle)]["uses"] == 2
    torch._C._cuda_releasePool(DEV, handle)
    assert _private_pools()[tuple(handle)]["uses"] == 1
    torch._C._cuda_releasePool(DEV, handle)
    assert _private_pools()[tuple(handle)]["uses"] == 0
    tt.empty_cache(DEV)
    assert tuple(handle) not in _private_pools()


def test_hooks_called_out_of_order_raise_runtime_error_with_tessera_message(state, lib, capfd):
    pool = (42, 0)
    with pytest.raises(RuntimeError, match=r"end_allocate_to_pool: .*not being routed to pool \(42, 0\)"):
        torch._C._cuda_endAllocateToPool(DEV, pool)
    # PyTorch releases from a graph's destructor, where a C++ throw would end the process: the
    # refusal is printed and kept as the thread's last error.
    lib.clear_last_error()
    torch._C._cuda_releasePool(DEV, pool)
    assert "tessera: release_pool: private pool: no private pool (42, 0)" in capfd.readouterr().err
    assert lib.last_error_code() == tessera.ErrorCode.PRIVATE_POOL
    torch._C._cuda_beginAllocateToPool(DEV, pool)
    with pytest.raises(RuntimeError, match="already routed"):
        torch._C._cuda_beginAllocateToPool(DEV, pool)
    torch._C._cuda_endAllocateToPool(DEV, pool)
    torch._C._cuda_releasePool(DEV, pool)
    tt.empty_cache(DEV)
    assert pool not in _private_pools()


def test_torch_compile_runs_cuda_graphs_without_trees_and_warns_once(state):
    import torch._inductor.config as inductor_config

    assert torch.compile is tt._compile
    tt._warned_trees = False
    inductor_config.triton.cudagraph_trees = True

    def f(x):
        return x + 1

    with pytest.warns(RuntimeWarning, match="without CUDA-graph trees"):
        torch.compile(f, mode="reduce-overhead")
    assert inductor_config.triton.cudagraph_trees is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.compile(f, mode="reduce-overhead")  # once only
        torch.compile(f)  # no CUDA graphs: nothing to say
    # Asking for trees by name cannot work: warned again, and dropped from the options.
    with pytest.warns(RuntimeWarning, match="pytorch#163257"):
        torch.compile(f, options={"triton.cudagraphs": True, "triton.cudagraph_trees": True})
    assert not torch.cuda.is_initialized()


def test_mempool_says_why_it_is_unavailable(state, monkeypatch):
    assert torch.cuda.MemPool.__init__ is tt._mempool_init

    def pytorch_refuses(self, *args, **kwargs):
        raise RuntimeError("CUDAPluggableAllocator does not yet support createOrIncrefPool. If you need it, ...")

    monkeypatch.setattr(tt, "_ORIGINAL_MEMPOOL_INIT", pytorch_refuses)
    with pytest.raises(RuntimeError, match="torch.cuda.MemPool is not available while tessera") as e:
        torch.cuda.MemPool()
    assert "graph_pool_handle" in str(e.value) and "createOrIncrefPool" in str(e.value)

    def other_error(self, *args, **kwargs):
        raise RuntimeError("Found no NVIDIA driver")

    monkeypatch.setattr(tt, "_ORIGINAL_MEMPOOL_INIT", other_error)
    with pytest.raises(RuntimeError, match="^Found no NVIDIA driver$"):
        torch.cuda.MemPool()


def test_memory_stats_answer_from_tessera(state, lib):
    ptrs = [lib.malloc(n, DEV) for n in (3 * MiB, 10 * MiB + 1, 700)]
    try:
        s = tt.stats(DEV)
        ms = torch.cuda.memory_stats(DEV)
        assert list(ms) == sorted(ms)
        expected = {
            "allocated_bytes.all.current": s["allocated_bytes"],
            "allocated_bytes.all.peak": s["peak_allocated_bytes"],
            "active_bytes.all.current": s["allocated_bytes"],
            "requested_bytes.all.current": s["requested_bytes"],
            "requested_bytes.all.peak": s["peak_requested_bytes"],
            "reserved_bytes.all.current": s["reserved_bytes"],
            "reserved_bytes.all.peak": s["peak_reserved_bytes"],
            "allocation.all.current": s["active_blocks"],
            "allocation.all.peak": s["peak_active_blocks"],
            "active.all.current": s["active_blocks"],
            "segment.all.current": s["segments"],
            "inactive_split_bytes.all.current": s["stranded_bytes"],
            "num_alloc_retries": s["alloc_retries"],
            "tessera.page_size": 2 * MiB,
            "tessera.stranded_bytes": s["stranded_bytes"],
            "tessera.largest_free_bytes": s["largest_free_bytes"],
            "tessera.invalid_frees": s["invalid_frees"],
            "tessera.cache_releases": s["cache_releases"],
            "tessera.remaps": s["remaps"],
            "tessera.limit_bytes": -1 if s["limit_bytes"] is None else s["limit_bytes"],
        }
        assert {key: ms[key] for key in expected} == expected
        assert s["requested_bytes"] >= 13 * MiB + 701 and s["active_blocks"] >= 3
        for metric in ("allocated_bytes", "reserved_bytes", "allocation", "segment"):
            for field in ("current", "peak", "allocated", "freed"):
                assert ms[f"{metric}.large_pool.{field}"] == ms[f"{metric}.all.{field}"]
                assert ms[f"{metric}.small_pool.{field}"] == 0
        nested = torch.cuda.memory_stats_as_nested_dict(DEV)
        assert nested["allocated_bytes"]["all"]["current"] == s["allocated_bytes"]
        assert nested["tessera"]["page_size"] == 2 * MiB

        for device in (DEV, f"cuda:{DEV}", torch.device("cuda", DEV)):
            assert torch.cuda.memory_allocated(device) == s["allocated_bytes"]
            assert torch.cuda.max_memory_allocated(device) == s["peak_allocated_bytes"]
            assert torch.cuda.memory_reserved(device) == s["reserved_bytes"]
            assert torch.cuda.max_memory_reserved(device) == s["peak_reserved_bytes"]
        with pytest.warns(FutureWarning):
            assert torch.cuda.memory_cached(DEV) == s["reserved_bytes"]  # torch's alias, via ours
    finally:
        for p in ptrs:
            lib.free(p, DEV)


def test_device_none_means_device_0_before_cuda_init(state, lib):
    p = lib.malloc(6 * MiB, 0)
    try:
        assert torch.cuda.memory_allocated() == lib.stats(0)["allocated_bytes"] >= 6 * MiB
        assert torch.cuda.memory_stats() == torch.cuda.memory_stats(0) == torch.cuda.memory_stats("cuda")
        assert torch.cuda.memory_allocated() != torch.cuda.memory_allocated(DEV)
    finally:
        lib.free(p, 0)
    with pytest.raises(ValueError, match="expected a CUDA device"):
        torch.cuda.memory_allocated("cpu")
    with pytest.raises(tessera.TesseraError, match="invalid device 99"):
        torch.cuda.memory_stats(99)


def test_reset_peak_memory_stats(state, lib):
    lib.free(lib.malloc(64 * MiB, DEV), DEV)
    assert torch.cuda.max_memory_allocated(DEV) >= torch.cuda.memory_allocated(DEV) + 64 * MiB
    torch.cuda.reset_peak_memory_stats(DEV)
    assert torch.cuda.max_memory_allocated(DEV) == torch.cuda.memory_allocated(DEV)
    assert torch.cuda.max_memory_reserved(DEV) == torch.cuda.memory_reserved(DEV)
    for reset in (torch.cuda.reset_max_memory_allocated, torch.cuda.reset_max_memory_cached):
        lib.free(lib.malloc(16 * MiB, DEV), DEV)
        assert torch.cuda.max_memory_allocated(DEV) >= 16 * MiB
        reset(f"cuda:{DEV}")
        assert torch.cuda.max_memory_allocated(DEV) == torch.cuda.memory_allocated(DEV)


def test_reset_accumulated_memory_stats(state, lib):
    lib.free(lib.malloc(MiB, DEV), DEV)
    torch.cuda.reset_accumulated_memory_stats(DEV)
    ms = torch.cuda.memory_stats(DEV)
    for metric in ("allocated_bytes", "active_bytes", "reserved_bytes", "allocation", "active"):
        assert ms[f"{metric}.all.allocated"] == ms[f"{metric}.all.freed"] == 0, metric
    assert ms["num_ooms"] == 0
    assert ms["allocated_bytes.all.current"] == tt.stats(DEV)["allocated_bytes"]  # current kept

    p = lib.malloc(5 * MiB, DEV)
    size = lib.base_alloc(p)[1]
    ms = torch.cuda.memory_stats(DEV)
    assert (ms["allocated_bytes.all.allocated"], ms["allocated_bytes.all.freed"]) == (size, 0)
    assert (ms["allocation.all.allocated"], ms["allocation.all.freed"]) == (1, 0)
    lib.free(p, DEV)
    with pytest.raises(tessera.TesseraError):
        lib.malloc(2 * GiB, DEV)
    released = tt.empty_cache(DEV)
    ms = torch.cuda.memory_stats(DEV)
    assert (ms["allocated_bytes.all.allocated"], ms["allocated_bytes.all.freed"]) == (size, size)
    assert (ms["allocation.all.allocated"], ms["allocation.all.freed"]) == (1, 1)
    assert ms["reserved_bytes.all.freed"] >= released > 0
    assert ms["num_ooms"] == 1
    other = torch.cuda.memory_stats(0)  # the baseline is per device
    assert other["allocation.all.allocated"] == tt.stats(0)["allocations"]


def test_memory_summary_renders_tessera_figures(state, lib):
    p = lib.malloc(3 * MiB, DEV)
    try:
        allocated = tt.stats(DEV)["allocated_bytes"]
        assert 768 * 1024 <= allocated < 768 * MiB  # shown in KiB
        text = torch.cuda.memory_summary(DEV)
        assert "tessera CUDA memory summary, device ID 1" in text
        row = next(line for line in text.splitlines() if line.startswith("| Allocated memory"))
        assert row.split("|")[2].strip() == f"{allocated // 1024} KiB"
        assert "from small pool" in text
        short = torch.cuda.memory.memory_summary(f"cuda:{DEV}", abbreviated=True)
        assert "Allocated memory" in short and "from small pool" not in short
        assert "tessera CUDA memory summary, device ID 0" in torch.cuda.memory_summary()
    finally:
        lib.free(p, DEV)


# tessera's own view through tessera.torch ----------------------------------------------------


def test_stats_snapshot_and_empty_cache(state, lib):
    p = lib.malloc(7 * MiB, DEV)
    ctypes.memset(p, 0x33, 7 * MiB)
    assert tt.stats(torch.device("cuda", DEV)) == lib.stats(DEV)
    snap = tt.snapshot(f"cuda:{DEV}")
    assert snap["device"] == DEV
    assert any(b["address"] == p for seg in snap["segments"] for b in seg["blocks"])
    lib.free(p, DEV)
    reserved = tt.stats(DEV)["reserved_bytes"]
    released = tt.empty_cache(DEV)
    assert released >= 6 * MiB and tt.stats(DEV)["reserved_bytes"] == reserved - released
    before = tt.stats(0)["reserved_bytes"]
    released = tt.empty_cache()  # every device; device 1 has nothing left to release
    assert tt.stats(0)["reserved_bytes"] == before - released and tt.stats(DEV)["reserved_bytes"] == 0


def test_on_oom_hook_frees_and_the_request_succeeds(state, lib):
    held = [lib.malloc(768 * MiB, DEV)]
    calls = []

    @tt.on_oom
    def drop(device, requested):
        calls.append((device, requested))
        if held:
            lib.free(held.pop(), device)

    try:
        p = lib.malloc(512 * MiB, DEV)
        assert calls == [(DEV, 512 * MiB)] and not held
        lib.free(p, DEV)
    finally:
        drop.remove()
        for q in held:
            lib.free(q, DEV)
        tt.empty_cache(DEV)
