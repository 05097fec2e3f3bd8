#!/usr/bin/env python3
"""Record the allocations of a real PyTorch workload, on the CPU, as a tessera trace.

The workload runs on the CPU under the PyTorch profiler with memory profiling on
(``torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True)``). The
profiler reports every allocation and every free of PyTorch's CPU allocator as a ``[memory]``
event with its address, its size (negative for a free) and the running total. This script takes
those events in time order and writes them in the tessera CSV trace format, gzip'd:

    # {"workload": ..., "torch": ..., "args": {...}, "events": N, "peak_live_bytes": P, ...}
    a,<id>,<size_bytes>,<stream>
    f,<id>

* Allocations of 8 bytes or less are dropped, with their frees (a GPU run keeps such scalars on
  the host).
* Addresses become small integer ids, unique among live allocations; a freed id is reused,
  lowest first (it compresses well).
* A free of an address never seen allocated (allocated before profiling began) is dropped; an
  allocation never freed stays live at the end of the trace.
* The stream is always 0 (the CPU has one).

The whole run is profiled, model construction and the first (warm-up) step included: the
parameters and optimizer states are allocated in the trace and stay live.

Workloads (each seeded: the shapes, hence the trace, are the same on every run):

    transformer  a GPT-style decoder trained with AdamW; the sequence length of each step is
                 random in [--min-seq, --max-seq] (the fragmentation-heavy case)
    cnn          a ResNet-like CNN trained with SGD + momentum; the batch size of each step is
                 random in [--min-batch, --max-batch]
    inference    autoregressive generation under torch.no_grad() with a KV cache grown by
                 torch.cat at every token, for prompts of several lengths

Usage (torch in a virtualenv outside the repository):

    /work/venv-torch/bin/python scripts/record_trace.py transformer --out traces/transformer-varlen.csv.gz
    /work/venv-torch/bin/python scripts/record_trace.py cnn --out traces/cnn-varbatch.csv.gz
    /work/venv-torch/bin/python scripts/record_trace.py inference --out traces/inference-kvcache.csv.gz

Each subcommand's ``--help`` lists its sizes. On Linux the script re-runs itself with
``MALLOC_MMAP_THRESHOLD_=131072`` unless that is set (see ``_reexec_with_fixed_mmap_threshold``):
without it the profiled inference run needs over 15 GB of memory. ``--source chrome`` reads
the events from the profiler's Chrome trace export instead of its event tree (slower; the same
events, for cross-checking).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import heapq
import json
import os
import random
import sys
import tempfile
import time


def _reexec_with_fixed_mmap_threshold() -> None:
    """Re-runs this script with glibc's mmap threshold fixed at 128 KiB.

    By default glibc raises the threshold after large frees, so large tensors come from the heap;
    with the profiler's small records interleaved between them, freed tensors cannot be
    coalesced or returned, and a run whose tensors grow (the KV cache) took 15 GB of RSS instead
    of 1.5 GB. A fixed threshold maps every large tensor on its own. The trace does not change
    (addresses are renamed to ids)."""
    if (__name__ == "__main__" and sys.platform.startswith("linux")
            and "MALLOC_MMAP_THRESHOLD_" not in os.environ):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


_reexec_with_fixed_mmap_threshold()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

# Allocations of this many bytes or fewer are dropped (with their frees).
SMALL_BYTES = 8


# ---------------------------------------------------------------------------------------------
# Models


class Block(nn.Module):
    """A pre-norm GPT block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache=None):
        """`cache` is None (training: full causal attention) or a list [k, v] (generation: the
        keys and values of the earlier positions, None at first; grown by torch.cat)."""
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = self._split(q), self._split(k), self._split(v)
        if cache is not None:
            if cache[0] is not None:
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            cache[0], cache[1] = k, v
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.attn_dropout if self.training else 0.0,
            # Prefill (several new positions over an empty cache) and training are causal; one
            # new position attends to everything before it.
            is_causal=n > 1,
        )
        y = y.transpose(1, 2).contiguous().view(b, n, c)
        x = x + self.drop(self.proj(y))
        x = x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))
        return x


class GPT(nn.Module):
    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, d_ff: int,
                 max_len: int, dropout: float, attn_dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, heads, d_ff, dropout, attn_dropout)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor, caches=None, start: int = 0, last_only: bool = False):
        n = idx.shape[1]
        pos = torch.arange(start, start + n, dtype=torch.long)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        if last_only:
            x = x[:, -1:, :]
        return self.head(self.ln_f(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    """ResNet-18-like: a 3x3 stem, four stages of two basic blocks, global pooling, a classifier."""

    def __init__(self, width: int, blocks: list[int], classes: int, stem_stride: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage, count in enumerate(blocks):
            cout = width * 2 ** stage
            for i in range(count):
                layers.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# Workloads: each runs entirely inside the profiler (model construction included).


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_transformer(args) -> dict:
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = GPT(args.vocab, args.d_model, args.layers, args.heads, 4 * args.d_model,
                args.max_seq, args.dropout, args.attn_dropout)
    # foreach=True: what AdamW does by default on CUDA (one multi-tensor step, its temporaries
    # for all parameters at once), not the per-parameter loop it defaults to on the CPU.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, foreach=True)
    model.train()
    lengths = []
    for step in range(args.steps):
        n = rng.randint(args.min_seq, args.max_seq)
        lengths.append(n)
        data = torch.randint(args.vocab, (args.batch, n + 1), generator=gen)
        inp, tgt = data[:, :-1], data[:, 1:]
        logits = model(inp)
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), tgt.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log(f"  step {step + 1}/{args.steps}: seq {n}, loss {loss.item():.3f}")
        del data, inp, tgt, logits, loss
    return {"params": sum(p.numel() for p in model.parameters()), "seq_lengths": lengths}


def run_cnn(args) -> dict:
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = ResNet(args.width, [2, 2, 2, 2], args.classes, args.stem_stride)
    # foreach=True: the CUDA default (see run_transformer).
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                          foreach=True)
    model.train()
    batches = []
    for step in range(args.steps):
        b = rng.randint(args.min_batch, args.max_batch)
        batches.append(b)
        x = torch.randn(b, 3, args.image, args.image, generator=gen)
        y = torch.randint(args.classes, (b,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log(f"  step {step + 1}/{args.steps}: batch {b}, loss {loss.item():.3f}")
        del x, y, loss
    return {"params": sum(p.numel() for p in model.parameters()), "batch_sizes": batches}


def run_inference(args) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    prompts = [int(p) for p in args.prompts.split(",")]
    max_len = max(prompts) + args.new_tokens
    model = GPT(args.vocab, args.d_model, args.layers, args.heads, 4 * args.d_model, max_len,
                0.0)
    model.eval()
    with torch.no_grad():
        for i, plen in enumerate(prompts):
            idx = torch.randint(args.vocab, (args.batch, plen), generator=gen)
            caches = [[None, None] for _ in model.blocks]
            logits = model(idx, caches, 0, last_only=True)  # prefill
            pos = plen
            out = [idx]
            for _ in range(args.new_tokens):
                probs = F.softmax(logits[:, -1, :] / args.temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
                out.append(nxt)
                logits = model(nxt, caches, pos, last_only=True)
                pos += 1
            text = torch.cat(out, dim=1)
            log(f"  prompt {i + 1}/{len(prompts)}: length {plen}, generated {text.shape[1] - plen}")
            del idx, caches, logits, probs, nxt, out, text
    return {"params": sum(p.numel() for p in model.parameters()), "prompt_lengths": prompts}


WORKLOADS = {"transformer": run_transformer, "cnn": run_cnn, "inference": run_inference}


# ---------------------------------------------------------------------------------------------
# Profiler events


def memory_events_tree(prof) -> list[tuple]:
    """(time_ns, order, address, bytes, total_allocated, device type) of every [memory] event,
    from the profiler's event tree."""
    alloc_tag = torch._C._profiler._EventType.Allocation
    out = []
    stack = list(reversed(prof.profiler.kineto_results.experimental_event_tree()))
    while stack:
        node = stack.pop()
        if node.tag == alloc_tag:
            e = node.typed[1]
            out.append((node.start_time_ns, len(out), e.ptr, e.alloc_size, e.total_allocated,
                        e.device.type))
        stack.extend(reversed(node.children))
    return out


def memory_events_chrome(prof) -> list[tuple]:
    """The same, from the Chrome trace export ("[memory]" instant events)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    out = []
    kinds = {0: "cpu", 1: "cuda"}
    for ev in trace["traceEvents"]:
        if ev.get("name") != "[memory]":
            continue
        a = ev["args"]
        out.append((round(ev["ts"] * 1000), a.get("Ev Idx", len(out)), a["Addr"], a["Bytes"],
                    a["Total Allocated"], kinds.get(a["Device Type"], str(a["Device Type"]))))
    return out


def to_trace(events: list[tuple]) -> tuple[list[str], dict]:
    """Orders the events by time and turns them into CSV lines; returns the lines and counts."""
    events.sort(key=lambda e: (e[0], e[1]))
    stats = {
        "profiler_events": len(events),
        "non_cpu_events": 0,
        "small_allocs_dropped": 0,
        "small_frees_dropped": 0,
        "unmatched_frees_dropped": 0,
        "unmatched_free_bytes": 0,
        "free_size_mismatches": 0,
        "realloc_of_live_address": 0,
        "total_allocated_chain_breaks": 0,
    }
    lines = []
    live: dict[int, tuple[int, int]] = {}  # address -> (id, size)
    small_live: set[int] = set()
    free_ids: list[int] = []  # a heap: freed ids, reused lowest first
    next_id = 0
    live_bytes = peak = 0
    prev_total = None
    for _, _, addr, nbytes, total, dev in events:
        if dev != "cpu":
            stats["non_cpu_events"] += 1
            continue
        # The running total must move by exactly this event's bytes if the order is right and
        # no event is missing.
        if prev_total is not None and total != prev_total + nbytes:
            stats["total_allocated_chain_breaks"] += 1
        prev_total = total
        if nbytes > 0:
            if addr in live or addr in small_live:
                # Never expected: the allocator handed out a live address. Treat it as freed.
                stats["realloc_of_live_address"] += 1
                if addr in live:
                    i, size = live.pop(addr)
                    heapq.heappush(free_ids, i)
                    live_bytes -= size
                    lines.append(f"f,{i}")
                small_live.discard(addr)
            if nbytes <= SMALL_BYTES:
                stats["small_allocs_dropped"] += 1
                small_live.add(addr)
                continue
            i = heapq.heappop(free_ids) if free_ids else next_id
            if i == next_id:
                next_id += 1
            live[addr] = (i, nbytes)
            live_bytes += nbytes
            peak = max(peak, live_bytes)
            lines.append(f"a,{i},{nbytes},0")
        elif nbytes < 0:
            if addr in live:
                i, size = live.pop(addr)
                if size != -nbytes:
                    stats["free_size_mismatches"] += 1
                heapq.heappush(free_ids, i)
                live_bytes -= size
                lines.append(f"f,{i}")
            elif addr in small_live:
                small_live.discard(addr)
                stats["small_frees_dropped"] += 1
            else:
                stats["unmatched_frees_dropped"] += 1
                stats["unmatched_free_bytes"] += -nbytes
    stats.update(
        events=len(lines),
        allocs=sum(1 for ln in lines if ln[0] == "a"),
        frees=sum(1 for ln in lines if ln[0] == "f"),
        ids=next_id,
        peak_live_bytes=peak,
        live_at_end=len(live),
        live_bytes_at_end=live_bytes,
    )
    return lines, stats


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the format and the details.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output file (.csv.gz)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    common.add_argument("--source", choices=["tree", "chrome"], default="tree",
                        help="read the profiler's event tree (default) or its Chrome trace")
    sub = p.add_subparsers(dest="workload", required=True)

    t = sub.add_parser("transformer", parents=[common], help="GPT-style decoder training, "
                       "variable sequence length")
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--min-seq", type=int, default=32)
    t.add_argument("--max-seq", type=int, default=512)
    t.add_argument("--vocab", type=int, default=8192)
    t.add_argument("--d-model", type=int, default=512)
    t.add_argument("--layers", type=int, default=6)
    t.add_argument("--heads", type=int, default=8)
    t.add_argument("--dropout", type=float, default=0.1, help="residual and MLP dropout")
    t.add_argument("--attn-dropout", type=float, default=0.0,
                   help="attention dropout (0 keeps the CPU on its flash-attention kernel, as a "
                   "GPU run would be; more forces the math kernel and T*T attention matrices)")

    c = sub.add_parser("cnn", parents=[common], help="ResNet-like CNN training, variable batch")
    c.add_argument("--steps", type=int, default=60)
    c.add_argument("--min-batch", type=int, default=8)
    c.add_argument("--max-batch", type=int, default=64)
    c.add_argument("--image", type=int, default=64, help="image side in pixels")
    c.add_argument("--width", type=int, default=64, help="channels of the first stage")
    c.add_argument("--stem-stride", type=int, default=1)
    c.add_argument("--classes", type=int, default=100)

    i = sub.add_parser("inference", parents=[common], help="autoregressive generation with a "
                       "growing KV cache")
    i.add_argument("--prompts", default="16,64,160,320",
                   help="comma-separated prompt lengths, one generation each")
    i.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt")
    i.add_argument("--batch", type=int, default=16)
    i.add_argument("--vocab", type=int, default=8192)
    i.add_argument("--d-model", type=int, default=768)
    i.add_argument("--layers", type=int, default=8)
    i.add_argument("--heads", type=int, default=12)
    i.add_argument("--temperature", type=float, default=1.0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    log(f"recording {args.workload} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    t0 = time.monotonic()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        info = WORKLOADS[args.workload](args)
    t1 = time.monotonic()
    log(f"workload done in {t1 - t0:.1f} s; reading the profiler's events")
    events = memory_events_chrome(prof) if args.source == "chrome" else memory_events_tree(prof)
    del prof
    lines, stats = to_trace(events)
    t2 = time.monotonic()

    meta = {
        "format": "tessera trace csv",
        "workload": args.workload,
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "command": "scripts/record_trace.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recorder": "torch.profiler.profile(activities=[CPU], profile_memory=True), "
                    "[memory] events, CPU allocator",
        "profiled": "whole run, model construction and first step included",
        "small_bytes_dropped_at_or_below": SMALL_BYTES,
        "threads": torch.get_num_threads(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "record_seconds": round(t1 - t0, 1),
        **info,
        **stats,
    }
    header = "# " + json.dumps(meta, separators=(",", ":"))
    assert "\n" not in header
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with gzip.open(args.out, "wt", compresslevel=9) as f:
        f.write(header + "\n")
        f.write("\n".join(lines))
        f.write("\n")
    size = os.path.getsize(args.out)
    log(f"wrote {args.out}: {stats['events']} events, peak live {stats['peak_live_bytes']} bytes "
        f"({stats['peak_live_bytes'] / 2**20:.1f} MiB), {size} bytes gzip'd; "
        f"post-processing {t2 - t1:.1f} s")
    log("stats: " + json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
