#!/usr/bin/env python3
"""tessera against PyTorch's allocators on a real GPU: what each costs, measured.

Run from the repository root on a machine with a GPU and PyTorch (build the library first:
`cargo build --release -p tessera-ffi`):

    PYTHONPATH=python python3 scripts/gpu-bench.py            # everything
    python3 scripts/gpu-bench.py --only pairs --only vmm      # a part
    python3 scripts/gpu-bench.py --dry-run                    # no GPU: wiring and arguments only

Three benchmarks, each allocator in its own subprocess (PyTorch's allocator is chosen before CUDA
is initialised, and a crash must not take the others with it):

  pairs   ns per `torch.empty(size, dtype=uint8, device="cuda")` + `del` pair, a cache hit, at
          512 B, 64 KiB, 2 MiB and 64 MiB (--sizes), with PyTorch's native allocator and with
          tessera (`tessera.torch.enable(oom_error="runtime")`). Medians of --repeats runs of
          --pairs pairs after a warm-up. Both include PyTorch's own per-tensor overhead (dispatch,
          the tensor object): compare the two, not either with a C figure.
  vmm     the CUDA virtual-memory calls tessera makes, per page of the minimum granularity, over
          --pages pages, through ctypes on libcuda (no PyTorch): cuMemCreate, cuMemMap,
          cuMemSetAccess (one page, and once over the whole range), cuMemUnmap, a remap (map at a
          new address + set access), cuMemRelease; medians and 90th percentiles in microseconds.
          `cuDriverGetVersion` is timed the same way: the ctypes call's own floor.
  train   a fragmentation-heavy training loop: a small transformer (--d-model, --layers) trained
          for --steps steps on batches whose sequence length is drawn from 32 to --max-seq at
          every step (fixed seed), with the native allocator, with
          `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`, and with tessera. Reported: median
          step time (after --warmup-steps), peak reserved bytes (torch.cuda.max_memory_reserved,
          which tessera.torch answers from tessera), peak allocated bytes, and the peak of the
          device's used memory (cuMemGetInfo via torch.cuda.mem_get_info, after every step: the
          same measure for all three).

Output: a table per benchmark, then one `JSON {...}` line per result (--json-out also writes them
to a file). A figure that was not measured is shown as `-` with the reason; none is ever filled
in. Exit status: 0 when every run finished, 1 when any failed, 3 when there is no GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
BENCHES = ("pairs", "vmm", "train")
# Worker name -> (benchmark, allocator).
WORKERS = {
    "pairs-native": ("pairs", "native"),
    "pairs-tessera": ("pairs", "tessera"),
    "vmm": ("vmm", None),
    "train-native": ("train", "native"),
    "train-expandable": ("train", "expandable"),
    "train-tessera": ("train", "tessera"),
}
DEFAULT_SIZES = "512,64KiB,2MiB,64MiB"
RESULT = "RESULT "
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def parse_size(text: str) -> int:
    """`512`, `64KiB`, `2MiB`, `1GiB` (binary units; `KB`/`MB`/`GB` read as binary too)."""
    t = text.strip()
    units = {"KiB": KiB, "MiB": MiB, "GiB": GiB, "KB": KiB, "MB": MiB, "GB": GiB, "K": KiB, "M": MiB,
             "G": GiB, "B": 1}
    for suffix, scale in units.items():
        if t.endswith(suffix):
            number = t[: -len(suffix)].strip()
            break
    else:
        number, scale = t, 1
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (expected e.g. 512, 64KiB, 2MiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} is not positive")
    return value


def parse_sizes(text: str) -> list[int]:
    return [parse_size(s) for s in text.split(",") if s.strip()]


def size_name(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GiB:.3f} GiB"


def emit(result: dict[str, Any]) -> None:
    """A worker's one result line, read by the parent."""
    print(RESULT + json.dumps(result, sort_keys=True), flush=True)


def enable_tessera() -> Any:
    """tessera.torch.enable before any CUDA use; returns the module."""
    import tessera.torch as tt

    tt.enable(oom_error="runtime")
    return tt


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# Workers (one per subprocess) --------------------------------------------------------------------


def worker_pairs(args: argparse.Namespace, allocator: str) -> dict[str, Any]:
    tt = enable_tessera() if allocator == "tessera" else None
    import torch

    dry = args.dry_run
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    pairs, repeats, warmup = (10, 2, 2) if dry else (args.pairs, args.repeats, args.warmup_pairs)
    if not dry:
        torch.cuda.init()
        torch.empty(1, device=device)  # the context and the allocator are up before timing
        torch.cuda.synchronize()
    out: dict[str, Any] = {"allocator": allocator, "pairs": pairs, "repeats": repeats, "sizes": {}}
    for size in args.sizes:
        empty = torch.empty
        u8 = torch.uint8
        for _ in range(warmup):
            t = empty(size, dtype=u8, device=device)
            del t
        runs = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            for _ in range(pairs):
                t = empty(size, dtype=u8, device=device)
                del t
            runs.append((time.perf_counter_ns() - start) / pairs)
        out["sizes"][str(size)] = {"ns_per_pair_median": statistics.median(runs), "ns_per_pair_min": min(runs),
                                   "runs": runs}
    if dry:
        out["status"] = "DRY"
        return out
    out["status"] = "DONE"
    out["device"] = torch.cuda.get_device_name(0)
    out["torch"] = torch.__version__
    if tt is not None:
        s = tt.stats(0)
        out["tessera_allocations"] = s["allocations"]
        if not s["allocations"]:
            out["status"] = "FAIL"
            out["why"] = "tessera was enabled but made no allocation: PyTorch did not use it"
    return out


class CudaError(RuntimeError):
    pass


class CUmemLocation(ctypes.Structure):
    # CUDA 12: {CUmemLocationType type; int id;}. CUDA 13.2 makes `id` a 4-byte union: same layout.
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemAllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", CUmemLocation),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", CUmemAllocFlags)]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0


class Cuda:
    """The few libcuda entry points the vmm benchmark calls; every CUresult is checked."""

    SIGNATURES: dict[str, list[Any]] = {
        "cuInit": [ctypes.c_uint],
        "cuDriverGetVersion": [ctypes.POINTER(ctypes.c_int)],
        "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
        "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
        "cuDevicePrimaryCtxRelease": [ctypes.c_int],
        "cuCtxSetCurrent": [ctypes.c_void_p],
        "cuMemGetAllocationGranularity": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(CUmemAllocationProp),
                                          ctypes.c_int],
        "cuMemAddressReserve": [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64,
                                ctypes.c_ulonglong],
        "cuMemAddressFree": [ctypes.c_uint64, ctypes.c_size_t],
        "cuMemCreate": [ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_size_t, ctypes.POINTER(CUmemAllocationProp),
                        ctypes.c_ulonglong],
        "cuMemRelease": [ctypes.c_ulonglong],
        "cuMemMap": [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_ulonglong, ctypes.c_ulonglong],
        "cuMemUnmap": [ctypes.c_uint64, ctypes.c_size_t],
        "cuMemSetAccess": [ctypes.c_uint64, ctypes.c_size_t, ctypes.POINTER(CUmemAccessDesc), ctypes.c_size_t],
        "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
    }
    # The header maps these names to versioned symbols.
    VERSIONED = {"cuDevicePrimaryCtxRelease": "cuDevicePrimaryCtxRelease_v2"}

    def __init__(self, path: str = "libcuda.so.1") -> None:
        self.lib = ctypes.CDLL(path)
        for name, argtypes in self.SIGNATURES.items():
            symbol = self.VERSIONED.get(name, name)
            fn = getattr(self.lib, symbol, None) or getattr(self.lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
            setattr(self, name, fn)

    def error_name(self, code: int) -> str:
        name = ctypes.c_char_p()
        if self.cuGetErrorName(code, ctypes.byref(name)) != 0 or not name.value:
            return f"CUresult {code}"
        return name.value.decode()

    def check(self, call: str, code: int) -> None:
        if code != 0:
            raise CudaError(f"{call} failed: {self.error_name(code)} ({code})")

    def timed(self, call: str, *args: Any) -> float:
        """Calls `call`, checks its result; the call's wall time in microseconds."""
        fn: Callable[..., int] = getattr(self, call)
        start = time.perf_counter_ns()
        code = fn(*args)
        elapsed = (time.perf_counter_ns() - start) / 1e3
        self.check(call, code)
        return elapsed


def layouts_ok() -> dict[str, int]:
    """The struct sizes the CUDA 12 headers give on x86-64 (checked in --dry-run too)."""
    sizes = {"CUmemLocation": ctypes.sizeof(CUmemLocation), "CUmemAllocationProp": ctypes.sizeof(CUmemAllocationProp),
             "CUmemAccessDesc": ctypes.sizeof(CUmemAccessDesc)}
    want = {"CUmemLocation": 8, "CUmemAllocationProp": 32, "CUmemAccessDesc": 12}
    if sizes != want:
        raise CudaError(f"ctypes struct sizes {sizes} differ from the CUDA headers' {want}")
    return sizes


def worker_vmm(args: argparse.Namespace) -> dict[str, Any]:
    sizes = layouts_ok()
    if args.dry_run:
        try:
            Cuda()
            found = True
        except OSError:
            found = False
        return {"status": "DRY", "struct_sizes": sizes, "libcuda_found": found}
    cu = Cuda()
    check = cu.check
    check("cuInit", cu.cuInit(0))
    version = ctypes.c_int()
    check("cuDriverGetVersion", cu.cuDriverGetVersion(ctypes.byref(version)))
    dev = ctypes.c_int()
    check("cuDeviceGet", cu.cuDeviceGet(ctypes.byref(dev), 0))
    ctx = ctypes.c_void_p()
    check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    check("cuCtxSetCurrent", cu.cuCtxSetCurrent(ctx))
    prop = CUmemAllocationProp()
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = dev.value
    gran = ctypes.c_size_t()
    check("cuMemGetAllocationGranularity",
          cu.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), CU_MEM_ALLOC_GRANULARITY_MINIMUM))
    page, n = gran.value, args.pages
    access = CUmemAccessDesc()
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = dev.value
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    # Two ranges: the pages are mapped in the first, then remapped into the second.
    bases = []
    for _ in range(2):
        base = ctypes.c_uint64()
        check("cuMemAddressReserve", cu.cuMemAddressReserve(ctypes.byref(base), n * page, page, 0, 0))
        bases.append(base.value)
    a, b = bases
    times: dict[str, list[float]] = {k: [] for k in (
        "cuDriverGetVersion", "cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemUnmap", "remap", "cuMemRelease")}
    handles: list[int] = []
    try:
        v = ctypes.c_int()
        for _ in range(n):
            times["cuDriverGetVersion"].append(cu.timed("cuDriverGetVersion", ctypes.byref(v)))
        for _ in range(n):
            h = ctypes.c_ulonglong()
            times["cuMemCreate"].append(cu.timed("cuMemCreate", ctypes.byref(h), page, ctypes.byref(prop), 0))
            handles.append(h.value)
        for i, h in enumerate(handles):
            times["cuMemMap"].append(cu.timed("cuMemMap", a + i * page, page, 0, h, 0))
        for i in range(n):
            times["cuMemSetAccess"].append(cu.timed("cuMemSetAccess", a + i * page, page, ctypes.byref(access), 1))
        # Access over the whole range at once (tessera sets access once per mapped run).
        whole_range_us = cu.timed("cuMemSetAccess", a, n * page, ctypes.byref(access), 1)
        for i in range(n):
            times["cuMemUnmap"].append(cu.timed("cuMemUnmap", a + i * page, page))
        # A remap: the page mapped at a new address, in reverse order, then made accessible.
        for i, h in enumerate(reversed(handles)):
            t = cu.timed("cuMemMap", b + i * page, page, 0, h, 0)
            t += cu.timed("cuMemSetAccess", b + i * page, page, ctypes.byref(access), 1)
            times["remap"].append(t)
        for i in range(n):
            check("cuMemUnmap", cu.cuMemUnmap(b + i * page, page))
        while handles:
            times["cuMemRelease"].append(cu.timed("cuMemRelease", handles.pop()))
    finally:
        # Best effort on the way out after a failure; the failure itself is what gets reported.
        for h in handles:
            cu.cuMemRelease(h)
        for base in bases:
            cu.cuMemAddressFree(base, n * page)
        cu.cuDevicePrimaryCtxRelease(dev)
    calls = {k: {"median_us": statistics.median(v), "p90_us": percentile(v, 0.9), "count": len(v)}
             for k, v in times.items()}
    return {"status": "DONE", "driver_version": version.value, "page_bytes": page, "pages": n, "calls": calls,
            "set_access_whole_range_us": whole_range_us, "set_access_whole_range_per_page_us": whole_range_us / n}


def worker_train(args: argparse.Namespace, allocator: str) -> dict[str, Any]:
    tt = enable_tessera() if allocator == "tessera" else None
    import torch
    import torch.nn as nn

    dry = args.dry_run
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    d_model, layers, batch, vocab = args.d_model, args.layers, args.batch, args.vocab
    steps, warmup, max_seq = args.steps, args.warmup_steps, args.max_seq
    if dry:  # the same code on the CPU, tiny
        d_model, layers, batch, vocab, steps, warmup, max_seq = 32, 1, 2, 100, 2, 1, 48
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            layer = nn.TransformerEncoderLayer(d_model, nhead=8, dim_feedforward=4 * d_model, dropout=0.1,
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
            self.head = nn.Linear(d_model, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(tokens)))

    model = Model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    data = torch.Generator().manual_seed(1234)  # CPU generator: the same batches for every allocator
    sync = (lambda: None) if dry else torch.cuda.synchronize
    if not dry:
        torch.cuda.reset_peak_memory_stats()
    times, lengths, used = [], [], []
    for _ in range(steps):
        seq = int(torch.randint(32, max_seq + 1, (1,), generator=data))
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=data).to(device)
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = loss_fn(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        loss.item()  # synchronizes
        times.append(time.perf_counter() - t0)
        lengths.append(seq)
        if not dry:
            free, total = torch.cuda.mem_get_info()
            used.append(total - free)
    out: dict[str, Any] = {
        "allocator": allocator, "steps": steps, "warmup_steps": warmup, "d_model": d_model, "layers": layers,
        "batch": batch, "max_seq": max_seq, "sequence_lengths": lengths,
        "step_time_median_s": statistics.median(times[warmup:]),
        "step_time_mean_s": statistics.fmean(times[warmup:]),
    }
    if dry:
        out["status"] = "DRY"
        return out
    out.update({
        "status": "DONE",
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_device_used_bytes": max(used),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    })
    if tt is not None:
        s = tt.stats(0)
        out["tessera"] = {k: s[k] for k in ("allocations", "remaps", "ooms", "reserved_bytes", "stranded_bytes")}
        if not s["allocations"]:
            out["status"] = "FAIL"
            out["why"] = "tessera was enabled but made no allocation: PyTorch did not use it"
    return out


def run_worker(name: str, args: argparse.Namespace) -> None:
    bench, allocator = WORKERS[name]
    try:
        if bench == "pairs":
            result = worker_pairs(args, allocator)
        elif bench == "vmm":
            result = worker_vmm(args)
        else:
            result = worker_train(args, allocator)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        result = {"status": "ERROR", "type": type(e).__name__, "message": str(e)[:1000],
                  "traceback": traceback.format_exc()[-3000:]}
    result["worker"] = name
    emit(result)


# The parent -------------------------------------------------------------------------------------


def worker_args(args: argparse.Namespace) -> list[str]:
    """The options a worker needs, passed through."""
    out = ["--sizes", ",".join(str(s) for s in args.sizes)]
    for opt in ("pairs", "repeats", "warmup_pairs", "pages", "steps", "warmup_steps", "max_seq", "batch", "d_model",
                "layers", "vocab"):
        out += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    if args.dry_run:
        out.append("--dry-run")
    return out


def spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs a worker in a subprocess; its RESULT, or an ERROR describing how it died."""
    _, allocator = WORKERS[name]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "python"), env.get("PYTHONPATH")]))
    env["TESSERA_DRIVER"] = "cuda"
    for var in ("TESSERA_SIM", "TESSERA_CONF", "TESSERA_TRACE", "PYTORCH_CUDA_ALLOC_CONF"):
        env.pop(var, None)
    if allocator == "expandable":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *worker_args(args)]
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"worker": name, "status": "ERROR", "message": f"timed out after {args.timeout} s"}
    seconds = time.perf_counter() - start
    results = [line[len(RESULT):] for line in p.stdout.splitlines() if line.startswith(RESULT)]
    if p.returncode != 0 or not results:
        how = f"exit status {p.returncode}" if p.returncode >= 0 else f"killed by signal {-p.returncode}"
        return {"worker": name, "status": "ERROR", "message": f"the worker process died ({how})",
                "stdout": p.stdout[-3000:], "stderr": p.stderr[-3000:], "seconds": round(seconds, 2)}
    result = json.loads(results[-1])
    result["seconds"] = round(seconds, 2)
    if result.get("status") == "ERROR":
        result["stderr"] = p.stderr[-3000:]
    return result


def failed(r: dict[str, Any]) -> Optional[str]:
    """Why a result carries no figures, or None."""
    if r.get("status") in ("DONE", "DRY"):
        return None
    return f"{r.get('status')}: {r.get('why') or r.get('type', '')} {r.get('message', '')}".strip()


def table_pairs(results: dict[str, dict[str, Any]], sizes: list[int]) -> list[str]:
    native, tess = results["pairs-native"], results["pairs-tessera"]
    if "DRY" in (native.get("status"), tess.get("status")):
        return [f"  {r['worker']}: " + (f"no figures ({failed(r)})" if failed(r) else
                                          "dry run: the loop ran on the CPU; not a measurement")
                for r in (native, tess)]
    lines = [f"{'size':>8}  {'native ns/pair':>15}  {'tessera ns/pair':>15}  {'tessera / native':>16}"]
    for size in sizes:
        cells = []
        for r in (native, tess):
            v = None if failed(r) else r["sizes"].get(str(size), {}).get("ns_per_pair_median")
            cells.append(v)
        ratio = f"{cells[1] / cells[0]:.2f}" if all(cells) else "-"
        shown = [f"{c:.0f}" if c is not None else "-" for c in cells]
        lines.append(f"{size_name(size):>8}  {shown[0]:>15}  {shown[1]:>15}  {ratio:>16}")
    for r in (native, tess):
        if failed(r):
            lines.append(f"  {r['worker']}: no figures ({failed(r)})")
    return lines


def table_vmm(r: dict[str, Any]) -> list[str]:
    if failed(r):
        return [f"  vmm: no figures ({failed(r)})"]
    if r.get("status") == "DRY":
        return [f"  vmm: dry run (struct sizes {r['struct_sizes']}, libcuda found: {r['libcuda_found']})"]
    lines = [f"driver {r['driver_version']}, {r['pages']} pages of {size_name(r['page_bytes'])}",
             f"{'call':<22} {'median us/page':>15} {'p90 us/page':>12}"]
    for call, v in r["calls"].items():
        label = "map + set access (remap)" if call == "remap" else call
        lines.append(f"{label:<22} {v['median_us']:>15.2f} {v['p90_us']:>12.2f}")
    lines.append(f"{'cuMemSetAccess, whole range':<22} {r['set_access_whole_range_per_page_us']:>15.2f} "
                 f"{'(per page)':>12}")
    return lines


def table_train(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"{'allocator':<11} {'median step':>12} {'peak reserved':>14} {'peak allocated':>15} "
             f"{'peak device used':>17} {'remaps':>7}"]
    for name in ("train-native", "train-expandable", "train-tessera"):
        r = results[name]
        why = failed(r)
        if why:
            lines.append(f"{WORKERS[name][1]:<11} no figures ({why})")
            continue
        step = f"{r['step_time_median_s'] * 1e3:.2f} ms"
        if r.get("status") == "DRY":
            lines.append(f"{WORKERS[name][1]:<11} {step:>12} (dry run on the CPU: not a measurement)")
            continue
        remaps = r.get("tessera", {}).get("remaps", "-")
        lines.append(f"{WORKERS[name][1]:<11} {step:>12} {gib(r['peak_reserved_bytes']):>14} "
                     f"{gib(r['peak_allocated_bytes']):>15} {gib(r['peak_device_used_bytes']):>17} {remaps!s:>7}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--only", action="append", choices=BENCHES, help="run only this benchmark (repeatable)")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                        help=f"pairs: comma-separated sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--pairs", type=int, default=20000, help="pairs: pairs per run (default 20000)")
    parser.add_argument("--repeats", type=int, default=7, help="pairs: runs per size, median taken (default 7)")
    parser.add_argument("--warmup-pairs", type=int, default=1000, help="pairs: untimed pairs first (default 1000)")
    parser.add_argument("--pages", type=int, default=256, help="vmm: pages created and mapped (default 256)")
    parser.add_argument("--steps", type=int, default=200, help="train: steps per run (default 200)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="train: steps left out of step times (default 10)")
    parser.add_argument("--max-seq", type=int, default=2048, help="train: longest sequence length (default 2048)")
    parser.add_argument("--batch", type=int, default=16, help="train: batch size (default 16)")
    parser.add_argument("--d-model", type=int, default=512, help="train: model width (default 512)")
    parser.add_argument("--layers", type=int, default=6, help="train: encoder layers (default 6)")
    parser.add_argument("--vocab", type=int, default=8192, help="train: vocabulary size (default 8192)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per subprocess (default 900)")
    parser.add_argument("--json-out", type=Path, help="also write every result to this file (JSON lines)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: check arguments, imports, tessera.torch.enable and the loops on the CPU")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for opt in ("pairs", "repeats", "pages", "steps", "batch", "d_model", "layers", "vocab"):
        if getattr(args, opt) < 1:
            parser.error(f"--{opt.replace('_', '-')} must be at least 1")
    if args.warmup_pairs < 0 or args.warmup_steps < 0:
        parser.error("warm-up counts cannot be negative")
    if args.warmup_steps >= args.steps:
        parser.error("--warmup-steps must be below --steps")
    if args.max_seq < 32:
        parser.error("--max-seq must be at least 32")
    if args.d_model % 8:
        parser.error("--d-model must be a multiple of 8 (8 attention heads)")
    if not args.sizes:
        parser.error("--sizes names no size")


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    check_args(parser, args)
    sys.path.insert(0, str(REPO / "python"))
    if args.worker:
        run_worker(args.worker, args)
        return 0
    benches = args.only or list(BENCHES)
    if not args.dry_run:
        import torch  # only asks; CUDA is initialised in the workers

        if not torch.cuda.is_available():
            print("gpu-bench: no CUDA device (torch.cuda.is_available() is False): nothing measured")
            return 3
        print(f"gpu-bench: torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{torch.cuda.get_device_name(0)}", flush=True)
    else:
        print("gpu-bench: dry run: every worker runs its code on the CPU or only loads; no figure below is a "
              "measurement", flush=True)
    records: list[dict[str, Any]] = []
    for bench in benches:
        names = [w for w, (b, _) in WORKERS.items() if b == bench]
        results = {name: spawn(name, args) for name in names}
        print(f"\n== {bench} ==")
        if bench == "pairs":
            lines = table_pairs(results, args.sizes)
        elif bench == "vmm":
            lines = table_vmm(results["vmm"])
        else:
            lines = table_train(results)
        print("\n".join(lines), flush=True)
        for r in results.values():
            r["bench"] = bench
            records.append(r)
            print("JSON " + json.dumps(r, sort_keys=True, default=str), flush=True)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))
    bad = [r for r in records if failed(r)]
    for r in bad:
        tail = (r.get("stderr") or r.get("traceback") or "").strip().splitlines()[-6:]
        print(f"gpu-bench: {r['worker']} failed: {failed(r)}" + ("\n  " + "\n  ".join(tail) if tail else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
