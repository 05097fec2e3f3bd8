"""The ctypes front (``tessera``) against libtessera.so on the simulated driver; no torch."""

from __future__ import annotations

import ctypes
import gc
import re
import threading

import pytest
from support import REPO, GiB, MiB

import tessera
from tessera import _lib
from tessera import ErrorCode as E

HEADER = REPO / "include" / "tessera.h"
SIZE_MAX = (1 << (8 * ctypes.sizeof(ctypes.c_size_t))) - 1
DEV = 1  # most tests use device 1 of the 2 simulated ones


def all_stats(lib: tessera.Library) -> list[dict]:
    return [lib.stats(d) for d in range(lib.device_count())]


def changed(before: dict, after: dict) -> set[str]:
    return {key for key in after if after[key] != before[key]}


# Finding and loading ------------------------------------------------------------------------


def test_find_library_prefers_tessera_library(monkeypatch, tmp_path):
    fake = tmp_path / "libtessera.so"
    fake.write_bytes(b"")
    monkeypatch.setenv("TESSERA_LIBRARY", str(fake))
    assert tessera.find_library() == fake.resolve()
    monkeypatch.setenv("TESSERA_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(tessera.LibraryNotFoundError, match="TESSERA_LIBRARY names .*missing.so"):
        tessera.find_library()
    assert tessera.find_library(fake) == fake.resolve()  # an explicit path comes first
    with pytest.raises(tessera.LibraryNotFoundError, match="the path given names .*other.so"):
        tessera.find_library(tmp_path / "other.so")


def test_find_library_order_next_to_package_then_release_then_debug(monkeypatch, tmp_path):
    monkeypatch.delenv("TESSERA_LIBRARY", raising=False)
    package = tmp_path / "python" / "tessera"
    package.mkdir(parents=True)
    monkeypatch.setattr(_lib, "_PACKAGE_DIR", package)
    with pytest.raises(tessera.LibraryNotFoundError) as error:
        tessera.find_library()
    message = str(error.value)
    assert "TESSERA_LIBRARY (not set)" in message and str(package / "libtessera.so") in message
    (tmp_path / "Cargo.toml").write_text("[workspace]\n")
    with pytest.raises(tessera.LibraryNotFoundError) as error:
        tessera.find_library()
    for profile in ("release", "debug"):
        assert str(tmp_path / "target" / profile / "libtessera.so") in str(error.value)
    for where in [tmp_path / "target" / "debug", tmp_path / "target" / "release", package]:
        where.mkdir(parents=True, exist_ok=True)
        (where / "libtessera.so").write_bytes(b"")
        assert tessera.find_library() == (where / "libtessera.so").resolve()


def test_load_is_cached_and_reports_version(lib):
    assert tessera.load() is lib
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", lib.version())
    assert lib.device_count() == 2


# The binding agrees with the header ---------------------------------------------------------


@pytest.fixture(scope="module")
def header() -> str:
    if not HEADER.is_file():
        pytest.skip(f"{HEADER} not present (package used outside the repository)")
    return HEADER.read_text()


def test_every_header_function_has_a_prototype_of_the_right_arity(header):
    declared = dict(re.findall(r"^[A-Za-z][^;(]*?\b(tessera_\w+)\(([^)]*)\);", header, re.M))
    assert set(declared) == set(tessera.PROTOTYPES)
    for name, params in declared.items():
        restype, argtypes = tessera.PROTOTYPES[name]
        arity = 0 if params.strip() == "void" else params.count(",") + 1
        assert len(argtypes) == arity, name
        returns_void = re.search(rf"^void {name}\(", header, re.M) is not None
        assert (restype is None) == returns_void, name


def test_stats_struct_matches_the_header(header, lib):
    body = re.search(r"typedef struct tessera_stats \{(.*?)\} tessera_stats;", header, re.S)
    assert body is not None
    fields = re.findall(r"^\s*uint64_t (\w+);", body.group(1), re.M)
    assert fields == [name for name, _ in tessera.Stats._fields_]
    assert lib.get_stats(0).size == ctypes.sizeof(tessera.Stats) == 8 * len(fields)


# Allocation, statistics, data ---------------------------------------------------------------


def test_malloc_free_counts_and_keeps_data(lib):
    before = lib.stats(DEV)
    sizes = [1000, 3 * MiB + 5, 64 * MiB]
    ptrs = [lib.malloc(n, DEV) for n in sizes]
    rounded = [lib.base_alloc(p) for p in ptrs]
    assert [base for base, _ in rounded] == ptrs
    assert all(size >= n for (_, size), n in zip(rounded, sizes))
    spans = sorted((p, p + n) for p, n in zip(ptrs, sizes))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), "allocations overlap"
    for i, (p, n) in enumerate(zip(ptrs, sizes)):
        ctypes.memset(p, 0x11 * (i + 1), n)

    mid = lib.stats(DEV)
    total = sum(size for _, size in rounded)
    assert mid["allocated_bytes"] - before["allocated_bytes"] == total
    assert mid["requested_bytes"] - before["requested_bytes"] == sum(sizes)
    assert mid["active_blocks"] - before["active_blocks"] == 3
    assert mid["allocations"] - before["allocations"] == 3
    assert mid["allocated_bytes_total"] - before["allocated_bytes_total"] == total
    assert mid["peak_allocated_bytes"] >= mid["allocated_bytes"]
    assert mid["reserved_bytes"] >= mid["allocated_bytes"]
    assert mid["cached_free_bytes"] == mid["reserved_bytes"] - mid["allocated_bytes"]

    other = lib.malloc(16 * MiB, DEV)  # more traffic must not disturb live data
    ctypes.memset(other, 0xEE, 16 * MiB)
    lib.free(other, DEV)
    for i, (p, n) in enumerate(zip(ptrs, sizes)):
        assert ctypes.string_at(p, n) == bytes([0x11 * (i + 1)]) * n

    for p in ptrs:
        lib.free(p)  # device found by pointer
    after = lib.stats(DEV)
    assert after["allocated_bytes"] == before["allocated_bytes"]
    assert after["requested_bytes"] == before["requested_bytes"]
    assert after["active_blocks"] == before["active_blocks"]
    assert after["frees"] - before["frees"] == 4
    lib.check_invariants(DEV)


def test_empty_cache_lowers_reserved_bytes(lib):
    p = lib.malloc(64 * MiB, DEV)
    lib.free(p, DEV)
    before = lib.stats(DEV)
    assert before["reserved_bytes"] >= 64 * MiB  # the freed memory stays cached
    released = lib.empty_cache(DEV)
    after = lib.stats(DEV)
    assert released >= 64 * MiB
    assert after["reserved_bytes"] == before["reserved_bytes"] - released
    assert after["released_bytes"] == before["released_bytes"] + released
    assert after["cache_releases"] == before["cache_releases"] + 1
    assert lib.empty_cache(DEV) == 0


def test_empty_cache_of_every_device(lib):
    for dev in (0, 1):
        lib.free(lib.malloc(8 * MiB, dev), dev)
    before = [s["reserved_bytes"] for s in all_stats(lib)]
    released = lib.empty_cache(-1)
    after = [s["reserved_bytes"] for s in all_stats(lib)]
    assert released >= 16 * MiB and released == sum(before) - sum(after)


def test_reset_peak_stats(lib):
    lib.free(lib.malloc(32 * MiB, DEV), DEV)
    s = lib.stats(DEV)
    assert s["peak_allocated_bytes"] >= s["allocated_bytes"] + 32 * MiB
    lib.reset_peak_stats(DEV)
    s = lib.stats(DEV)
    for name in ("allocated_bytes", "requested_bytes", "reserved_bytes", "active_blocks"):
        assert s[f"peak_{name}"] == s[name], name


def test_limit_and_memory_fraction(lib):
    """The byte limit and the fraction are two caps; the lower one is in force."""
    try:
        lib.set_memory_fraction(0.25, DEV)
        assert lib.stats(DEV)["limit_bytes"] == 256 * MiB
        with pytest.raises(tessera.TesseraError) as error:
            lib.malloc(300 * MiB, DEV)
        assert error.value.code == E.OUT_OF_MEMORY
        assert error.value.message.startswith("CUDA out of memory.")
        lib.set_limit(DEV, 128 * MiB)
        assert lib.stats(DEV)["limit_bytes"] == 128 * MiB
        lib.set_limit(DEV, None)
        assert lib.stats(DEV)["limit_bytes"] == 256 * MiB
        lib.set_memory_fraction(1.0, DEV)
        lib.free(lib.malloc(300 * MiB, DEV), DEV)
    finally:
        lib.set_memory_fraction(1.0, DEV)
        lib.set_limit(DEV, None)
        lib.empty_cache(DEV)


def test_base_alloc_of_an_interior_pointer(lib):
    p = lib.malloc(5 * MiB, DEV)
    base, size = lib.base_alloc(p + 4096 + 3)
    assert (base, size) == (p, lib.base_alloc(p)[1]) and size >= 5 * MiB
    assert lib.cdll.tessera_base_alloc(p + 8, None) == p  # size may be NULL
    lib.free(p, DEV)
    with pytest.raises(tessera.TesseraError) as error:
        lib.base_alloc(p)
    assert error.value.code == E.UNKNOWN_POINTER


def test_snapshot_lists_live_blocks_and_stats(lib):
    p = lib.malloc(5 * MiB + 7, DEV)
    try:
        snap = lib.snapshot(DEV)
        stats = lib.stats(DEV)
        assert snap["device"] == DEV and snap["page_size"] == stats["page_size"] == 2 * MiB
        mine = [b for seg in snap["segments"] for b in seg["blocks"] if b["address"] == p]
        assert len(mine) == 1
        assert mine[0]["state"] == "allocated" and mine[0]["requested_size"] == 5 * MiB + 7
        assert mine[0]["size"] == lib.base_alloc(p)[1]
        assert all(seg["kind"] in ("large", "small", "legacy") for seg in snap["segments"])
        # The C struct sums the private pools; the JSON lists them (and capture_underway is a bool).
        sums = {"private_pool_held_bytes", "private_pool_allocated_bytes"}
        assert set(snap["stats"]) == (set(stats) - sums) | {"last_driver_error"}
        pools = snap["stats"]["private_pools"]
        assert len(pools) == stats["private_pools"]
        assert sum(q["held_bytes"] for q in pools) == stats["private_pool_held_bytes"]
        assert sum(q["allocated_bytes"] for q in pools) == stats["private_pool_allocated_bytes"]
        assert snap["stats"]["capture_underway"] == bool(stats["capture_underway"])
        plain = set(stats) - sums - {"private_pools", "capture_underway"}
        assert {k: snap["stats"][k] for k in plain} == {k: stats[k] for k in plain}
    finally:
        lib.free(p, DEV)


def test_snapshot_json_truncates_like_snprintf(lib):
    full = lib.snapshot_json(DEV).encode()
    call = lib.cdll.tessera_snapshot_json
    assert call(DEV, None, 0) == len(full)
    buf = ctypes.create_string_buffer(b"\xff" * 16)
    assert call(DEV, buf, 10) == len(full)
    assert buf.raw[:9] == full[:9] and buf.raw[9] == 0 and buf.raw[10:16] == b"\xff" * 6
    one = ctypes.create_string_buffer(b"\xff" * 2)
    assert call(DEV, one, 1) == len(full) and one.raw[:2] == b"\x00\xff"
    exact = ctypes.create_string_buffer(len(full))  # one byte short of the NUL
    assert call(DEV, exact, len(full)) == len(full)
    assert exact.raw == full[:-1] + b"\x00"


# Bad input: an error, no crash, nothing changed ---------------------------------------------


@pytest.mark.parametrize("kind", ["unknown", "interior", "double"])
def test_bad_free(lib, capfd, kind):
    keep = lib.malloc(4 * MiB, DEV)
    ctypes.memset(keep, 0x5A, 4 * MiB)
    if kind == "unknown":
        ptr, code = 0x1000, E.UNKNOWN_POINTER
    elif kind == "interior":
        ptr, code = keep + 512, E.UNKNOWN_POINTER
    else:
        ptr, code = lib.malloc(MiB, DEV), E.DOUBLE_FREE
        lib.free(ptr, DEV)
    capfd.readouterr()
    before = lib.stats(DEV)
    with pytest.raises(tessera.TesseraError) as error:
        lib.free(ptr, DEV)
    assert error.value.code == code
    err = capfd.readouterr().err
    assert err.startswith(f"tessera: tessera_free({ptr:#x}): ") and err.count("\n") == 1, err
    after = lib.stats(DEV)
    assert changed(before, after) == {"invalid_frees"}
    assert after["invalid_frees"] == before["invalid_frees"] + 1
    assert ctypes.string_at(keep, 4 * MiB) == b"\x5a" * (4 * MiB)
    lib.free(keep, DEV)


def test_free_of_unknown_pointer_without_device(lib, capfd):
    before = all_stats(lib)
    with pytest.raises(tessera.TesseraError) as error:
        lib.free(0x2000)
    assert error.value.code == E.UNKNOWN_POINTER
    assert capfd.readouterr().err.startswith("tessera: tessera_free(0x2000): ")
    assert all_stats(lib) == before  # no device to count it on


def test_free_null_and_malloc_zero_are_no_ops(lib, capfd):
    capfd.readouterr()
    before = all_stats(lib)
    lib.clear_last_error()
    lib.free(0, DEV)
    lib.cdll.tessera_free(None, 0, -1, None)
    assert lib.malloc(0, DEV) == 0
    assert lib.cdll.tessera_malloc(0, DEV, None) is None
    assert lib.last_error_code() == E.OK and lib.last_error() == ""
    assert all_stats(lib) == before
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    "call, code",
    [
        (lambda lib: lib.malloc(SIZE_MAX, 0), E.INVALID_SIZE),
        (lambda lib: lib.malloc(MiB, -1), E.INVALID_DEVICE),
        (lambda lib: lib.malloc(MiB, 99), E.INVALID_DEVICE),
        (lambda lib: lib.stats(-1), E.INVALID_DEVICE),
        (lambda lib: lib.stats(99), E.INVALID_DEVICE),
        (lambda lib: lib.empty_cache(99), E.INVALID_DEVICE),
        (lambda lib: lib.snapshot_json(99), E.INVALID_DEVICE),
        (lambda lib: lib.reset_peak_stats(99), E.INVALID_DEVICE),
        (lambda lib: lib.check_invariants(-1), E.INVALID_DEVICE),
        (lambda lib: lib.set_limit(99, 0), E.INVALID_DEVICE),
        (lambda lib: lib.init(5), E.INVALID_DEVICE),
        (lambda lib: lib.base_alloc(0x1000), E.UNKNOWN_POINTER),
        (lambda lib: lib.base_alloc(0), E.UNKNOWN_POINTER),
        (lambda lib: lib.record_stream(0x1000, None), E.UNKNOWN_POINTER),
        (lambda lib: lib.set_memory_fraction(-0.5, 0), E.INVALID_ARGUMENT),
        (lambda lib: lib.set_memory_fraction(1.5, 0), E.INVALID_ARGUMENT),
        (lambda lib: lib.set_memory_fraction(float("nan"), 0), E.INVALID_ARGUMENT),
        (lambda lib: lib.remove_oom_hook(12345), E.INVALID_ARGUMENT),
        (lambda lib: lib.configure("limit:1GiB"), E.CONFIG),  # the allocator is in use
    ],
)
def test_bad_calls_raise_and_change_nothing(lib, call, code):
    before = all_stats(lib)
    with pytest.raises(tessera.TesseraError) as error:
        call(lib)
    assert error.value.code == code and error.value.message
    assert lib.last_error_code() == code
    assert all_stats(lib) == before


def test_raw_null_and_short_pointers(lib):
    cdll = lib.cdll
    assert cdll.tessera_get_stats(0, None) == E.INVALID_ARGUMENT
    assert lib.last_error_code() == E.INVALID_ARGUMENT and "NULL" in lib.last_error()
    short = tessera.Stats(size=4)
    assert cdll.tessera_get_stats(0, ctypes.byref(short)) == E.INVALID_ARGUMENT
    assert cdll.tessera_add_oom_hook(tessera.OOM_HOOK(), None) == -1
    assert lib.last_error_code() == E.INVALID_ARGUMENT


def test_get_stats_into_an_older_smaller_struct(lib):
    p = lib.malloc(MiB, DEV)
    out = tessera.Stats(*([0xDEAD] * len(tessera.Stats._fields_)))
    out.size = 16  # size + allocated_bytes only
    assert lib.cdll.tessera_get_stats(DEV, ctypes.byref(out)) == 0
    assert out.size == 16 and out.allocated_bytes == lib.stats(DEV)["allocated_bytes"]
    assert out.peak_allocated_bytes == 0xDEAD and out.page_size == 0xDEAD  # not written
    lib.free(p, DEV)


def test_last_error_is_sticky_and_per_thread(lib):
    lib.clear_last_error()
    assert (lib.last_error_code(), lib.last_error()) == (E.OK, "")
    with pytest.raises(tessera.TesseraError):
        lib.malloc(MiB, 99)
    p = lib.cdll.tessera_malloc(MiB, DEV, None)  # a success does not clear it
    assert p and lib.last_error_code() == E.INVALID_DEVICE and "99" in lib.last_error()
    seen = []
    thread = threading.Thread(target=lambda: seen.append((lib.last_error_code(), lib.last_error())))
    thread.start()
    thread.join()
    assert seen == [(E.OK, "")]
    lib.free(p, DEV)
    lib.clear_last_error()
    assert lib.last_error_code() == E.OK


# OOM hooks ----------------------------------------------------------------------------------


def test_ctypes_hook_frees_through_tessera_free_and_the_request_succeeds(lib):
    held = [lib.malloc(768 * MiB, DEV)]
    calls = []

    @tessera.OOM_HOOK
    def hook(device, requested, user):
        calls.append((device, requested, user))
        if held:
            lib.cdll.tessera_free(held.pop(), 0, device, None)
            return 768 * MiB
        return 0

    hook_id = lib.cdll.tessera_add_oom_hook(hook, ctypes.c_void_p(0x1234))
    assert hook_id >= 0
    try:
        before = lib.stats(DEV)
        p = lib.malloc(512 * MiB, DEV)
        assert calls == [(DEV, 512 * MiB, 0x1234)] and not held
        after = lib.stats(DEV)
        assert after["hook_calls"] == before["hook_calls"] + 1 and after["ooms"] == before["ooms"]
        ctypes.memset(p + 511 * MiB, 0x42, MiB)
        assert ctypes.string_at(p + 511 * MiB, MiB) == b"\x42" * MiB
        lib.free(p, DEV)
    finally:
        lib.remove_oom_hook(hook_id)
        lib.empty_cache(DEV)


def test_python_hook_exception_is_printed_and_the_request_fails(lib, capfd):
    held = lib.malloc(768 * MiB, DEV)

    def exploding_hook(device, requested):
        raise ValueError("boom from the hook")

    hook = lib.add_oom_hook(exploding_hook)
    try:
        before = lib.stats(DEV)
        capfd.readouterr()
        with pytest.raises(tessera.TesseraError) as error:
            lib.malloc(512 * MiB, DEV)
        assert error.value.code == E.OUT_OF_MEMORY
        assert error.value.message.startswith("CUDA out of memory.")
        err = capfd.readouterr().err
        assert "tessera: OOM hook" in err and "Traceback (most recent call last)" in err
        assert "in exploding_hook" in err and "ValueError: boom from the hook" in err
        after = lib.stats(DEV)
        assert after["ooms"] == before["ooms"] + 1 and after["hook_calls"] == before["hook_calls"] + 1
    finally:
        hook.remove()
        lib.free(held, DEV)
        lib.empty_cache(DEV)


def test_hook_as_decorator_and_remove(lib):
    calls = []

    @lib.add_oom_hook
    def record(device, requested):
        calls.append((device, requested))

    assert isinstance(record, tessera.OomHook) and record.id is not None
    record(0, 5)  # the handle calls the function
    assert calls == [(0, 5)]
    calls.clear()
    with pytest.raises(tessera.TesseraError):
        lib.malloc(2 * GiB, DEV)  # larger than the device: the hooks run once, then it fails
    assert calls == [(DEV, 2 * GiB)]
    hook_id = record.id
    record.remove()
    record.remove()  # a second remove does nothing
    calls.clear()
    with pytest.raises(tessera.TesseraError):
        lib.malloc(2 * GiB, DEV)
    assert calls == []
    with pytest.raises(tessera.TesseraError) as error:
        lib.remove_oom_hook(hook_id)
    assert error.value.code == E.INVALID_ARGUMENT


def test_hook_without_a_kept_handle_stays_alive(lib):
    calls = []
    hook_id = lib.add_oom_hook(lambda device, requested: calls.append(requested)).id
    gc.collect()
    try:
        with pytest.raises(tessera.TesseraError):
            lib.malloc(3 * GiB, DEV)
        assert calls == [3 * GiB]
    finally:
        lib.remove_oom_hook(hook_id)


# The snapshot in PyTorch's format -------------------------------------------------------------


def test_memory_snapshot_is_pytorchs_format_and_tiles_every_segment(lib):
    p = lib.malloc(3 * MiB + 100, 0)
    q = lib.malloc(700, 1)
    try:
        snap = lib.memory_snapshot()
        assert set(snap) >= {"segments", "device_traces", "allocator_settings"}
        assert len(snap["device_traces"]) == 2 and snap["device_traces"] == [[], []]
        assert snap["allocator_settings"]["allocator"].startswith("tessera ")
        blocks = {b["address"]: (seg, b) for seg in snap["segments"] for b in seg["blocks"]}
        seg, b = blocks[p]
        assert (seg["device"], b["state"], b["requested_size"]) == (0, "active_allocated", 3 * MiB + 100)
        assert b["size"] >= 3 * MiB + 100 and seg["segment_type"] == "large"
        seg, b = blocks[q]
        assert (seg["device"], b["requested_size"], seg["segment_type"]) == (1, 700, "small")
        for seg in snap["segments"]:
            # As _memory_viz stats checks: the blocks tile the segment, in address order.
            at = seg["address"]
            for b in seg["blocks"]:
                assert b["address"] == at and b["size"] > 0
                at += b["size"]
            assert at == seg["address"] + seg["total_size"]
            allocated = sum(b["size"] for b in seg["blocks"] if b["state"] == "active_allocated")
            assert seg["allocated_size"] == allocated
        one = lib.memory_snapshot(1)
        assert {s["device"] for s in one["segments"]} == {1}
        with pytest.raises(tessera.TesseraError):
            lib.memory_snapshot(7)
    finally:
        lib.free(p, 0)
        lib.free(q, 1)


# CUDA graphs: private pools through the C ABI -----------------------------------------------


def _pool_of(lib, device, ptr):
    blocks = (b for s in lib.snapshot(device)["segments"] for b in s["blocks"])
    return next(b["pool"] for b in blocks if b["address"] == ptr)


def test_a_route_sends_the_streams_its_filter_accepts_to_the_private_pool(lib):
    seen = []
    pool = (31, 0)

    def accepts(stream):
        seen.append(stream)
        return stream == 0x21

    lib.begin_allocate_to_pool(DEV, pool, accepts)
    try:
        assert lib.stats(DEV)["capture_underway"] == 1
        routed = lib.malloc(2 * MiB, DEV, 0x21)
        ordinary = lib.malloc(2 * MiB, DEV, 0x22)
        assert 0x21 in seen and 0x22 in seen
        assert _pool_of(lib, DEV, routed) == [31, 0]
        assert _pool_of(lib, DEV, ordinary) is None
        s = lib.stats(DEV)
        assert s["private_pools"] == 1 and s["private_pool_allocated_bytes"] == 2 * MiB
        assert s["private_pool_held_bytes"] >= 2 * MiB
    finally:
        lib.end_allocate_to_pool(DEV, pool)
    assert lib.stats(DEV)["capture_underway"] == 0
    assert not lib._filters, "the filter was dropped when the route ended"
    # Freed, the block stays the pool's: an ordinary request gets other memory.
    lib.free(routed, DEV)
    again = lib.malloc(2 * MiB, DEV, 0x21)
    assert again != routed
    lib.free(again, DEV)
    lib.release_pool(DEV, pool)
    assert lib.stats(DEV)["private_pools"] == 1, "released: listed until the device is idle"
    lib.free(ordinary, DEV)
    lib.empty_cache(DEV)  # synchronizes the device, drains the pool, releases everything
    assert lib.stats(DEV)["private_pools"] == 0
    assert lib.stats(DEV)["reserved_bytes"] == 0


def test_a_filter_that_raises_routes_nothing(lib):
    def broken(_stream):
        raise ValueError("no")

    lib.begin_allocate_to_pool(DEV, (32, 0), broken)
    p = lib.malloc(MiB, DEV, 0x21)
    assert _pool_of(lib, DEV, p) is None
    lib.end_allocate_to_pool(DEV, (32, 0))
    lib.release_pool(DEV, (32, 0))
    lib.free(p, DEV)
    lib.empty_cache(DEV)


def test_pool_calls_out_of_order_raise_private_pool_errors(lib):
    with pytest.raises(tessera.TesseraError, match="not being routed") as e:
        lib.end_allocate_to_pool(DEV, (33, 0))
    assert e.value.code == E.PRIVATE_POOL
    with pytest.raises(tessera.TesseraError, match="no private pool"):
        lib.release_pool(DEV, (33, 0))
    with pytest.raises(tessera.TesseraError, match=r"\(0, 0\)"):
        lib.begin_allocate_to_pool(DEV, (0, 0), lambda s: True)
    assert not lib._filters, "a refused begin drops its filter too"
    with pytest.raises(tessera.TesseraError) as e:
        lib.graph_hook_address("set_init_fn")
    assert e.value.code == E.INVALID_ARGUMENT
    addresses = {s: lib.graph_hook_address(s) for s in tessera._lib.GRAPH_SETTERS}
    assert len(set(addresses.values())) == 3 and all(addresses.values())
