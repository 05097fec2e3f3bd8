#!/usr/bin/env python3
"""tessera as PyTorch's CUDA allocator, checked on a real GPU.

Run from the repository root on a machine with a GPU and PyTorch (no cargo needed):

    PYTHONPATH=python TESSERA_LIBRARY=target/release/libtessera.so python3 scripts/gpu_torch_check.py

Every check runs in its own subprocess (the allocator can only be chosen before CUDA is
initialised, and a crash must not take the other checks with it) and prints one line,
PASS/FAIL/SKIP with its figures, plus a `JSON {...}` line with everything it measured:

  train         a small transformer (4 TransformerEncoderLayers, d_model 256) trained for --steps
                steps on variable sequence lengths from a fixed seed, once with PyTorch's native
                allocator and once with tessera, deterministic settings: the losses must match;
                peak reserved memory and the median step time of both are reported
  oom           an absurd request raises torch.cuda.OutOfMemoryError or a RuntimeError whose
                message starts "CUDA out of memory.", and the process keeps working
  oom_hook      under a 1 GiB cap (tt.enable(conf="limit:1GiB")), a request that fails while a
                cached tensor is held succeeds once an on_oom hook drops that tensor
  empty_cache   torch.cuda.empty_cache() gives freed memory back to the driver
                (torch.cuda.mem_get_info)
  record_stream a tensor read on a second stream (record_stream) and freed while that stream is
                still busy is not handed out again before the stream is done, under a cap that
                leaves no other memory: the reader sees the right values
  graph         a small model's whole training step (forward, backward, SGD step) captured with
                torch.cuda.graph and replayed --steps times: the losses must equal eager mode's,
                the graph's loss and gradients must sit in its private pool and no eager tensor
                made afterwards in one, and after the graph is deleted and empty_cache runs no
                pool is left and reserved memory is back to what it was before the capture
  graph_api     two graphs sharing pool=torch.cuda.graph_pool_handle() (the second reads the
                first's output; the pool has 2 uses), make_graphed_callables (forward and
                backward against the eager module), torch.compile(mode="reduce-overhead")
                (CUDA graphs without trees under tessera) against eager

Exit status: 0 when every check passed or was skipped and at least one passed; 1 when any
failed; 3 when nothing was checked (no GPU). --dry-run only imports and wires everything (no CUDA
work), to check the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
CHECKS = ("train", "oom", "oom_hook", "empty_cache", "record_stream", "snapshot", "graph", "graph_api")
WORKERS = ("train-native", "train-tessera", "oom", "oom_hook", "empty_cache", "record_stream", "snapshot", "graph",
           "graph_api")
MiB = 1 << 20
GiB = 1 << 30
OOM_PREFIX = "CUDA out of memory."
RESULT = "RESULT "


# Helpers shared by both sides -------------------------------------------------------------------


def gib(n: Optional[float]) -> str:
    return "?" if n is None else f"{n / GiB:.3f} GiB"


def emit(result: dict[str, Any]) -> None:
    """A worker's one result line, read by the parent."""
    print(RESULT + json.dumps(result, sort_keys=True), flush=True)


def enable_tessera(conf: Optional[str] = None) -> Any:
    """tessera.torch.enable before any CUDA use; returns the module."""
    import tessera.torch as tt

    state = tt.enable(conf)
    return tt, state


def starts_oom(message: str) -> bool:
    return message.startswith(OOM_PREFIX)


# Workers (one per subprocess) -------------------------------------------------------------------


def worker_train(args: argparse.Namespace, use_tessera: bool) -> dict[str, Any]:
    """Trains the small transformer; returns its losses, peak reserved bytes and step times."""
    tt = state = None
    if use_tessera:
        tt, state = enable_tessera()
    import torch
    import torch.nn as nn

    if args.dry_run:
        return {"status": "DRY", "allocator": "tessera" if use_tessera else "native"}
    seen_warnings: list[str] = []
    warnings.simplefilter("always")
    torch.manual_seed(0)
    torch.cuda.manual_seed_all(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # The math attention kernel: flash / memory-efficient backward may use atomics.
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)

    vocab, d_model, layers, batch = 1000, 256, 4, 16

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            layer = nn.TransformerEncoderLayer(
                d_model, nhead=8, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
            self.head = nn.Linear(d_model, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(tokens)))

    model = Model().cuda()  # weights from manual_seed(0), made on the CPU: the same in both runs
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    data = torch.Generator().manual_seed(1234)  # CPU generator: the same batches in both runs
    losses, times, lengths = [], [], []
    torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        for _ in range(args.steps):
            seq = int(torch.randint(16, 257, (1,), generator=data))
            tokens = torch.randint(0, vocab, (batch, seq + 1), generator=data).cuda()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = model(tokens[:, :-1])
            loss = loss_fn(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            value = loss.item()  # synchronizes
            times.append(time.perf_counter() - t0)
            losses.append(value)
            lengths.append(seq)
        seen_warnings = sorted({str(w.message)[:200] for w in caught})
    out: dict[str, Any] = {
        "status": "DONE",
        "allocator": "tessera" if use_tessera else "native",
        "steps": args.steps,
        "losses": losses,
        "sequence_lengths": lengths,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "step_time_median_s": statistics.median(times),
        "step_time_median_after_first_s": statistics.median(times[1:]) if len(times) > 1 else None,
        "warnings": seen_warnings,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }
    if use_tessera:
        s = tt.stats(0)
        out["oom_error_mode"] = state.oom_error
        out["tessera"] = {k: s[k] for k in ("allocations", "remaps", "ooms", "reserved_bytes", "stranded_bytes")}
        if s["allocations"] == 0:
            out["status"] = "FAIL"
            out["why"] = "tessera was enabled but made no allocation: PyTorch did not use it"
    return out


def worker_oom(args: argparse.Namespace) -> dict[str, Any]:
    """An absurd request raises an OOM that says so; the process keeps working."""
    tt, state = enable_tessera()
    import torch

    if args.dry_run:
        return {"status": "DRY"}
    warm = torch.ones(1 << 20, device="cuda")
    absurd = 1 << 50  # 1 PiB
    raised, kind, message = False, None, ""
    try:
        torch.empty(absurd, dtype=torch.uint8, device="cuda")
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        raised, kind, message = True, type(e).__name__, str(e)
    out = {"raised": raised, "type": kind, "message": message[:400], "oom_error_mode": state.oom_error}
    problems = []
    if not raised:
        problems.append("a 1 PiB request did not raise")
    elif not starts_oom(message):
        problems.append(f"the message does not start with {OOM_PREFIX!r}")
    # The process keeps working: a plain computation and a 1 GiB allocation, right.
    a = torch.arange(1 << 20, device="cuda", dtype=torch.float64)
    total = a.sum().item()
    want = float((1 << 20) * ((1 << 20) - 1) // 2)
    big = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    big.fill_(3)
    big_sum = int(big[:: 1 << 20].sum().item())
    torch.cuda.synchronize()
    if total != want:
        problems.append(f"after the OOM, arange(2^20).sum() = {total}, expected {want}")
    if big_sum != 3 * 1024:
        problems.append(f"after the OOM, a 1 GiB tensor filled with 3 reads back {big_sum} at 1024 points")
    ooms = tt.stats(0)["ooms"]
    num_ooms = torch.cuda.memory_stats()["num_ooms"]
    out.update(tessera_ooms=ooms, torch_num_ooms=num_ooms, warm_ok=bool(warm.sum().item() == (1 << 20)))
    if ooms < 1 or num_ooms < 1:
        problems.append(f"the OOM was not counted (tessera ooms {ooms}, torch num_ooms {num_ooms})")
    out["status"] = "FAIL" if problems else "PASS"
    out["why"] = "; ".join(problems)
    return out


def worker_oom_hook(args: argparse.Namespace) -> dict[str, Any]:
    """Under a 1 GiB cap, a hook that drops a cached tensor lets a failing request through."""
    cap = GiB
    tt, state = enable_tessera(conf="limit:1GiB")
    import torch

    if args.dry_run:
        return {"status": "DRY"}
    size = 600 * MiB
    cache = [torch.empty(size, dtype=torch.uint8, device="cuda")]  # what the hook may drop
    problems = []
    # 1. Without a hook: 600 MiB held + 600 MiB asked > 1 GiB cap: it fails.
    try:
        torch.empty(size, dtype=torch.uint8, device="cuda")
        failed_first, first_message = False, ""
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        failed_first, first_message = True, str(e)
    if not failed_first:
        problems.append("600 MiB + 600 MiB under a 1 GiB cap succeeded without a hook: the cap is not applied")
    elif not starts_oom(first_message):
        problems.append(f"the OOM message does not start with {OOM_PREFIX!r}: {first_message[:200]}")
    # 2. With a hook that drops the cached tensor: the same request succeeds.
    calls: list[tuple[int, int]] = []

    def drop_cache(device: int, requested: int) -> int:
        calls.append((device, requested))
        freed = sum(t.numel() for t in cache)
        cache.clear()  # the tensor's storage goes back to tessera now, from inside the hook
        return freed

    hook_calls_before = tt.stats(0)["hook_calls"]
    handle = tt.on_oom(drop_cache)
    try:
        x = torch.empty(size, dtype=torch.uint8, device="cuda")
        x.fill_(7)
        ok_second = int(x[:: 1 << 20].sum().item()) == 7 * 600
        second_error = ""
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        ok_second, second_error = False, str(e)
    finally:
        handle.remove()
    s = tt.stats(0)
    if not ok_second:
        problems.append(f"with the hook, the request still failed or read back wrong: {second_error[:300]}")
    if len(calls) != 1 or calls[0][0] != 0 or calls[0][1] < size:
        problems.append(f"the hook was called {calls}, expected once with (0, >= {size})")
    if s["hook_calls"] != hook_calls_before + 1:
        problems.append(f"stats hook_calls {hook_calls_before} -> {s['hook_calls']}, expected +1")
    if s["reserved_bytes"] > cap:
        problems.append(f"reserved {s['reserved_bytes']} exceeds the 1 GiB cap")
    return {
        "status": "FAIL" if problems else "PASS",
        "why": "; ".join(problems),
        "cap_bytes": cap,
        "held_bytes": size,
        "requested_bytes": size,
        "hook_calls": calls,
        "limit_bytes": s["limit_bytes"],
        "reserved_bytes": s["reserved_bytes"],
        "first_message": first_message[:300],
    }


def worker_empty_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Freed memory stays cached (the driver still sees it used) until torch.cuda.empty_cache()."""
    tt, state = enable_tessera()
    import torch

    if args.dry_run:
        return {"status": "DRY"}
    size = 2 * GiB
    torch.cuda.init()
    free0, total = torch.cuda.mem_get_info()
    x = torch.empty(size, dtype=torch.uint8, device="cuda")
    x.fill_(1)
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    del x
    torch.cuda.synchronize()
    free2, _ = torch.cuda.mem_get_info()
    reserved_before = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    free3, _ = torch.cuda.mem_get_info()
    reserved_after = torch.cuda.memory_reserved()
    slack = 256 * MiB  # other users of the GPU, the CUDA context's own growth
    problems = []
    if free0 - free1 < size - slack:
        problems.append(f"allocating 2 GiB lowered the driver's free memory by only {gib(free0 - free1)}")
    if free2 > free1 + slack:
        problems.append(f"freeing the tensor released memory at once ({gib(free2 - free1)}): no caching")
    if free3 - free2 < size - slack:
        problems.append(f"empty_cache gave back only {gib(free3 - free2)} of 2 GiB")
    if reserved_after >= reserved_before or reserved_after > slack:
        problems.append(f"memory_reserved {reserved_before} -> {reserved_after} across empty_cache")
    return {
        "status": "FAIL" if problems else "PASS",
        "why": "; ".join(problems),
        "total_bytes": total,
        "free_before": free0,
        "free_allocated": free1,
        "free_after_del": free2,
        "free_after_empty_cache": free3,
        "reserved_before_empty_cache": reserved_before,
        "reserved_after_empty_cache": reserved_after,
    }


def worker_snapshot(args: argparse.Namespace) -> dict[str, Any]:
    """torch.cuda.memory._snapshot() and _dump_snapshot() under tessera (they raise for a plain
    pluggable allocator): the live tensors are active blocks of their requested size, and PyTorch's
    viewer (torch.cuda._memory_viz) reads the dumped file."""
    tt, state = enable_tessera()
    import tempfile

    import torch
    from torch.cuda import _memory_viz

    if args.dry_run:
        return {"status": "DRY"}
    tensors = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in (512, 3 * MiB + 7, 96 * MiB)]
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    blocks = {b["address"]: b for s in snap["segments"] for b in s["blocks"]}
    problems = []
    for t in tensors:
        b = blocks.get(t.data_ptr())
        if b is None or b["state"] != "active_allocated" or b["requested_size"] != t.numel():
            problems.append(f"tensor of {t.numel()} B at {t.data_ptr():#x}: block {b}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "snapshot.pickle")
        torch.cuda.memory._dump_snapshot(path)
        with open(path, "rb") as f:
            text = _memory_viz.segsum(pickle.load(f))
    reserved = sum(s["total_size"] for s in snap["segments"])
    if f"total_reserved: {_memory_viz.Bytes(reserved)}" not in text:
        problems.append(f"_memory_viz stats disagrees: {text[-300:]}")
    if reserved != torch.cuda.memory_reserved():
        problems.append(f"segments hold {reserved} B, memory_reserved() says {torch.cuda.memory_reserved()}")
    return {
        "status": "FAIL" if problems else "PASS",
        "why": "; ".join(problems),
        "segments": len(snap["segments"]),
        "reserved_bytes": reserved,
    }


def worker_record_stream(args: argparse.Namespace) -> dict[str, Any]:
    """A tensor read on stream 2 after a long sleep is freed (record_stream) while stream 2 is
    busy; a cap leaves no other memory for the next tensor of that size, so tessera must wait for
    stream 2 before reusing it. Stream 2's result must be right."""
    cap = 512 * MiB
    tt, state = enable_tessera(conf="limit:512MiB")
    import torch

    if args.dry_run:
        return {"status": "DRY"}
    n = 32 * MiB  # float32 elements: 128 MiB
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    rounds, reused, busy_at_free, problems = 3, 0, 0, []
    for r in range(rounds):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # nothing cached: the cap below really leaves no other room
        with torch.cuda.stream(s1):
            a = torch.full((n,), 7.0, device="cuda")
        s2.wait_stream(s1)
        with torch.cuda.stream(s2):
            torch.cuda._sleep(1_000_000_000)  # ~0.5 s of GPU cycles before stream 2 reads a
            b = a * 2
        a.record_stream(s2)
        a_ptr = a.data_ptr()
        # Fill the cap: after this, a's memory is the only room for another 128 MiB.
        s = tt.stats(0)
        room = max(0, cap - s["reserved_bytes"])
        ballast = torch.empty(room, dtype=torch.uint8, device="cuda") if room else None
        busy = not s2.query()
        busy_at_free += busy
        del a  # freed (on s1) while s2 still has to read it
        with torch.cuda.stream(s1):
            c = torch.full((n,), -1.0, device="cuda")
        reused += c.data_ptr() == a_ptr
        torch.cuda.synchronize()
        del ballast  # room for the comparisons' temporaries
        b_ok = bool((b == 14.0).all().item())
        c_ok = bool((c == -1.0).all().item())
        if not b_ok:
            wrong = int((b != 14.0).sum().item())
            problems.append(f"round {r}: stream 2 read {wrong} wrong values of a tensor freed after record_stream")
        if not c_ok:
            problems.append(f"round {r}: the new tensor lost its values")
        del b, c
    s = tt.stats(0)
    if busy_at_free == 0:
        return {"status": "SKIP", "why": "stream 2 was never busy at the free: inconclusive", "rounds": rounds}
    return {
        "status": "FAIL" if problems else "PASS",
        "why": "; ".join(problems),
        "rounds": rounds,
        "stream2_busy_at_free": busy_at_free,
        "reused_same_address": reused,
        "reserved_bytes": s["reserved_bytes"],
        "cap_bytes": cap,
    }


def _pool_blocks(tt: Any, device: int = 0) -> dict[int, Any]:
    """address -> the block's pool ([a, b] or None), from tessera's snapshot."""
    return {b["address"]: b["pool"] for s in tt.snapshot(device)["segments"] for b in s["blocks"]}


def worker_graph(args: argparse.Namespace) -> dict[str, Any]:
    """A small model's whole training step captured with torch.cuda.graph and replayed under
    tessera: the losses equal eager mode's, the graph's memory is its private pool's and no eager
    tensor gets it, and the memory comes back after the graph is deleted and empty_cache runs."""
    tt, state = enable_tessera()
    import copy

    import torch

    if args.dry_run:
        return {"status": "DRY", "hooks": list(state.hooks)}
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(dev)
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05)
    loss_fn = torch.nn.MSELoss()
    batches = [(torch.randn(32, 64, device=dev), torch.randn(32, 10, device=dev)) for _ in range(args.steps + 3)]
    static_x, static_y = torch.empty_like(batches[0][0]), torch.empty_like(batches[0][1])

    def step(m: Any, o: Any, x: Any, y: Any) -> Any:
        o.zero_grad(set_to_none=True)
        loss = loss_fn(m(x), y)
        loss.backward()
        o.step()
        return loss

    # Warm-up on a side stream (PyTorch's recipe), the same batches eagerly for the reference.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:3]:
        step(eager, eager_opt, x, y)
    torch.cuda.synchronize()
    # cuBLAS keeps a workspace per (handle, stream) for the process's life; the capture's stream
    # would get new ones inside the pool. Cleared before both measurements, as PyTorch's own tests do.
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)
    clear_workspaces()
    torch.cuda.empty_cache()
    reserved_before = tt.stats(0)["reserved_bytes"]

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):  # raises if the capture was invalidated
        static_loss = loss_fn(model(static_x), static_y)
        static_loss.backward()
        opt.step()
    pool = tuple(graph.pool())
    pools = {tuple(p["id"]): p for p in tt.snapshot(0)["stats"]["private_pools"]}
    graph_losses, eager_losses = [], []
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        graph_losses.append(static_loss.item())
        eager_losses.append(step(eager, eager_opt, x, y).item())
    blocks = _pool_blocks(tt)
    loss_in_pool = blocks.get(static_loss.data_ptr()) == list(pool)
    grads_in_pool = all(blocks.get(p.grad.data_ptr()) == list(pool) for p in model.parameters())
    # Eager tensors made now, of the graph's sizes, never get the pool's memory.
    eager_tensors = [torch.empty_like(p) for p in model.parameters()] + [torch.empty(32, 256, device=dev)]
    blocks = _pool_blocks(tt)
    eager_private = [t.data_ptr() for t in eager_tensors if blocks.get(t.data_ptr()) is not None]
    close = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(graph_losses, eager_losses))
    # Delete the graph and everything it owns: its pool joins the ordinary cache.
    del graph, static_loss, eager_tensors
    for p in model.parameters():
        p.grad = None
    opt = None
    torch.cuda.synchronize()
    import gc

    gc.collect()
    clear_workspaces()
    torch.cuda.empty_cache()
    after = tt.stats(0)
    ok = (
        close
        and pool in pools
        and pools[pool]["uses"] == 1
        and loss_in_pool
        and grads_in_pool
        and not eager_private
        and after["private_pools"] == 0
        and after["reserved_bytes"] <= reserved_before
    )
    return {
        "status": "PASS" if ok else "FAIL",
        "why": (
            f"{len(graph_losses)} replays, losses equal eager: {close} (last {graph_losses[-1]:.6f} vs "
            f"{eager_losses[-1]:.6f}); pool {pool} held {pools.get(pool, {}).get('held_bytes')} B, loss and "
            f"grads in it: {loss_in_pool and grads_in_pool}; eager tensors in a pool: {len(eager_private)}; "
            f"after delete + empty_cache: {after['private_pools']} pools, reserved "
            f"{after['reserved_bytes']} B (before the capture {reserved_before} B)"
        ),
        "graph_losses": graph_losses,
        "eager_losses": eager_losses,
        "pool": pools.get(pool),
        "reserved_before": reserved_before,
        "reserved_after": after["reserved_bytes"],
    }


def worker_graph_api(args: argparse.Namespace) -> dict[str, Any]:
    """Two graphs sharing a pool (pool=torch.cuda.graph_pool_handle()), make_graphed_callables,
    and torch.compile(mode="reduce-overhead"), each against eager mode."""
    tt, state = enable_tessera()
    import torch

    if args.dry_run:
        return {"status": "DRY"}
    dev = torch.device("cuda")
    results: dict[str, Any] = {}
    # 1. A shared pool: the second graph reads the first one's output.
    handle = torch.cuda.graph_pool_handle()
    x = torch.randn(1 << 16, device=dev)
    g1, g2 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1, pool=handle):
        y1 = x * 2
    with torch.cuda.graph(g2, pool=handle):
        y2 = y1 + 1
    pools = {tuple(p["id"]): p for p in tt.snapshot(0)["stats"]["private_pools"]}
    x.copy_(torch.arange(x.numel(), device=dev, dtype=x.dtype))
    g1.replay()
    g2.replay()
    shared_ok = bool(torch.equal(y2, x * 2 + 1)) and pools.get(tuple(handle), {}).get("uses") == 2
    results["shared_pool"] = {"ok": shared_ok, "uses": pools.get(tuple(handle), {}).get("uses")}
    del g1, g2, y1, y2
    # 2. make_graphed_callables: forward and backward against the eager module.
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(dev)
    sample = torch.randn(16, 32, device=dev, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(module, (sample,))
    inp = torch.randn(16, 32, device=dev, requires_grad=True)
    out = graphed(inp)
    out.sum().backward()
    g_in = inp.grad.clone()
    inp.grad = None
    ref = module(inp)
    ref.sum().backward()
    callables_ok = bool(torch.allclose(out, ref, atol=1e-5)) and bool(torch.allclose(g_in, inp.grad, atol=1e-5))
    results["make_graphed_callables"] = {"ok": callables_ok}
    # 3. torch.compile with CUDA graphs (no trees under tessera).
    try:
        def f(t: Any) -> Any:
            return (t * 3).sin() + 1

        compiled = torch.compile(f, mode="reduce-overhead")
        t = torch.randn(1 << 12, device=dev)
        outs = [compiled(t).clone() for _ in range(3)]
        compile_ok = all(bool(torch.allclose(o, f(t), atol=1e-5)) for o in outs)
        pools = len(tt.snapshot(0)["stats"]["private_pools"])
        results["compile_reduce_overhead"] = {"ok": compile_ok, "private_pools": pools}
    except Exception as e:  # noqa: BLE001 - reported (no triton, for example)
        results["compile_reduce_overhead"] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    ok = all(r["ok"] for r in results.values())
    return {
        "status": "PASS" if ok else "FAIL",
        "why": "; ".join(f"{k}: {'ok' if v['ok'] else v}" for k, v in results.items()),
        **results,
    }


def run_worker(name: str, args: argparse.Namespace) -> None:
    """Runs one worker in this process and prints its RESULT line."""
    try:
        if name == "train-native":
            result = worker_train(args, use_tessera=False)
        elif name == "train-tessera":
            result = worker_train(args, use_tessera=True)
        else:
            result = globals()["worker_" + name](args)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        result = {"status": "ERROR", "type": type(e).__name__, "message": str(e)[:1000],
                  "traceback": traceback.format_exc()[-3000:]}
    result["worker"] = name
    emit(result)


# The parent --------------------------------------------------------------------------------------


def spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs a worker in a subprocess; its RESULT, or an ERROR describing how it died."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "python"), env.get("PYTHONPATH")]))
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS
    env["PYTHONHASHSEED"] = "0"
    env["TESSERA_DRIVER"] = "cuda"  # the real GPU, whatever the caller's shell says
    for var in ("TESSERA_SIM", "TESSERA_CONF", "TESSERA_TRACE", "PYTORCH_CUDA_ALLOC_CONF"):
        env.pop(var, None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--steps", str(args.steps)]
    if args.dry_run:
        cmd.append("--dry-run")
    start = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        return {"worker": name, "status": "ERROR", "message": f"timed out after {args.timeout} s",
                "stderr": (e.stderr or "")[-3000:] if isinstance(e.stderr, str) else ""}
    seconds = time.perf_counter() - start
    results = [line[len(RESULT):] for line in p.stdout.splitlines() if line.startswith(RESULT)]
    if p.returncode != 0 or not results:
        how = f"exit status {p.returncode}" if p.returncode >= 0 else f"killed by signal {-p.returncode}"
        return {"worker": name, "status": "ERROR", "message": f"the worker process died ({how})",
                "stdout": p.stdout[-3000:], "stderr": p.stderr[-3000:], "seconds": seconds}
    result = json.loads(results[-1])
    result["seconds"] = round(seconds, 2)
    if result.get("status") == "ERROR":
        result["stderr"] = p.stderr[-3000:]
    return result


def judge_train(native: dict[str, Any], tess: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    figures = {"native": native, "tessera": tess}
    for r in (native, tess):
        if r.get("status") != "DONE":
            return "FAIL", f"the {r.get('worker')} run did not finish: {r.get('why') or r.get('message')}", figures
    a, b = native["losses"], tess["losses"]
    if len(a) != len(b) or not a:
        return "FAIL", f"{len(a)} native losses, {len(b)} tessera losses", figures
    if not all(math.isfinite(x) for x in a + b):
        return "FAIL", "a loss is not finite", figures
    diffs = [abs(x - y) for x, y in zip(a, b)]
    close = all(abs(x - y) <= 1e-6 + 1e-5 * abs(y) for x, y in zip(a, b))
    figures["max_abs_loss_diff"] = max(diffs)
    figures["bitwise_equal"] = a == b
    text = (
        f"{len(a)} steps, losses {'match' if close else 'DIFFER'} (max |diff| {max(diffs):.3g}, "
        f"bitwise {'equal' if a == b else 'not equal'}; first {a[0]:.4f}, last {a[-1]:.4f}); "
        f"peak reserved native {gib(native['peak_reserved_bytes'])}, tessera {gib(tess['peak_reserved_bytes'])}; "
        f"median step native {native['step_time_median_s'] * 1e3:.2f} ms, "
        f"tessera {tess['step_time_median_s'] * 1e3:.2f} ms"
    )
    if not close:
        warn = sorted(set(native.get("warnings", []) + tess.get("warnings", [])))
        text += f"; determinism warnings: {warn[:3]}"
    return ("PASS" if close else "FAIL"), text, figures


def judge(name: str, r: dict[str, Any]) -> tuple[str, str]:
    status = r.get("status")
    if status == "ERROR":
        return "FAIL", f"{r.get('type', '')} {r.get('message', '')}".strip() + _tail(r)
    details = {k: v for k, v in r.items() if k not in ("status", "why", "worker", "seconds")}
    text = r.get("why") or ", ".join(f"{k}={v}" for k, v in details.items() if not isinstance(v, (list, dict)))
    return status or "FAIL", text


def _tail(r: dict[str, Any]) -> str:
    tail = (r.get("stderr") or r.get("traceback") or "").strip().splitlines()[-6:]
    return ("\n      " + "\n      ".join(tail)) if tail else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--only", action="append", choices=CHECKS, help="run only this check (repeatable)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per check subprocess (default 600)")
    parser.add_argument("--json-out", type=Path, help="also write every result to this file (JSON lines)")
    parser.add_argument("--dry-run", action="store_true",
                        help="import and wire everything in each subprocess, but run no CUDA work")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.worker:
        sys.path.insert(0, str(REPO / "python"))
        run_worker(args.worker, args)
        return 0

    sys.path.insert(0, str(REPO / "python"))
    import tessera

    lib = tessera.load()
    print(f"gpu_torch_check: library {lib.path} (tessera {lib.version()}), python {sys.executable}", flush=True)
    if not args.dry_run:
        import torch  # only asks; CUDA is initialised in the workers

        if not torch.cuda.is_available():
            for name in args.only or CHECKS:
                print(f"SKIP {name}: no CUDA device (torch.cuda.is_available() is False)")
            print("gpu_torch_check: nothing was checked")
            return 3
        print(f"gpu_torch_check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"{torch.cuda.device_count()} device(s)", flush=True)

    records: list[dict[str, Any]] = []
    verdicts: dict[str, str] = {}
    for name in args.only or CHECKS:
        if name == "train":
            native, tess = spawn("train-native", args), spawn("train-tessera", args)
            if args.dry_run:
                verdict, text, figures = _dry(native, tess)
            else:
                verdict, text, figures = judge_train(native, tess)
            record = {"check": name, "verdict": verdict, **figures}
        else:
            r = spawn(name, args)
            verdict, text = _dry(r)[:2] if args.dry_run else judge(name, r)
            record = {"check": name, "verdict": verdict, **r}
        verdicts[name] = verdict
        records.append(record)
        print(f"{verdict} {name}: {text}", flush=True)
        print("JSON " + json.dumps(record, sort_keys=True, default=str), flush=True)

    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text("".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records))
    counts = {v: sum(1 for x in verdicts.values() if x == v) for v in ("PASS", "FAIL", "SKIP", "DRY")}
    print(f"gpu_torch_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
          + (f", {counts['DRY']} dry" if counts["DRY"] else ""))
    if counts["FAIL"]:
        return 1
    if args.dry_run:
        return 0
    return 0 if counts["PASS"] else 3


def _dry(*results: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """A dry run passes when every worker imported and answered."""
    bad = [r for r in results if r.get("status") != "DRY"]
    if bad:
        r = bad[0]
        return "FAIL", f"{r.get('worker')}: {r.get('status')}: {r.get('message', '')}" + _tail(r), {"results": list(results)}
    return "DRY", "subprocess, imports and tessera.torch.enable wiring OK (no CUDA work)", {"results": list(results)}


if __name__ == "__main__":
    sys.exit(main())
