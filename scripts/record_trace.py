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
    checkpoint   the transformer workload with every block under activation checkpointing
                 (torch.utils.checkpoint, use_reentrant=False): recomputed in the backward pass
    moe          a GPT-style decoder whose MLPs are mixtures of experts (a learned router, top-k
                 of --experts per token, each expert run on the tokens gathered for it, so the
                 per-expert batches vary step to step), trained with AdamW; variable sequence
                 length as in transformer
    unet         a UNet (GroupNorm, skip connections concatenated on the way up) trained with
                 AdamW on a per-pixel cross-entropy + Dice loss; batch random in
                 [--min-batch, --max-batch] and image side random in [--min-image, --max-image]
                 (multiples of 2**depth) per step
    bert         a BERT-like encoder trained with AdamW on a masked-LM loss; each step draws
                 --batch log-uniform sequence lengths and pads to the longest, with an attention
                 mask over the padding (dynamic padding)

Usage (torch in a virtualenv outside the repository):

    /work/venv-torch/bin/python scripts/record_trace.py transformer --out traces/transformer-varlen.csv.gz
    /work/venv-torch/bin/python scripts/record_trace.py cnn --out traces/cnn-varbatch.csv.gz
    /work/venv-torch/bin/python scripts/record_trace.py inference --out traces/inference-kvcache.csv.gz
    /work/venv-torch/bin/python scripts/record_trace.py checkpoint --out traces/checkpoint-varlen.csv.gz
    /work/venv-torch/bin/python scripts/record_trace.py moe --out traces/moe-top2.csv.gz
    /work/venv-torch/bin/python scripts/record_trace.py unet --out traces/unet-varsize.csv.gz
    /work/venv-torch/bin/python scripts/record_trace.py bert --out traces/bert-dynpad.csv.gz
    /work/venv-torch/bin/python scripts/record_trace.py cnn --image 160 --min-batch 4 --max-batch 12 --steps 12 --out traces/cnn160-varbatch.csv.gz

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
import math
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
from torch.utils.checkpoint import checkpoint  # noqa: E402

# Allocations of this many bytes or fewer are dropped (with their frees).
SMALL_BYTES = 8


# ---------------------------------------------------------------------------------------------
# Models


class Block(nn.Module):
    """A pre-norm GPT block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float, attn_dropout: float):
        super().__init__()
        self._init_attention(d_model, heads, dropout, attn_dropout)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def _init_attention(self, d_model: int, heads: int, dropout: float, attn_dropout: float):
        """The attention half, and the norm before the MLP (shared with MoEBlock)."""
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def attend(self, x: torch.Tensor, cache=None):
        """x plus the causal self-attention of ln1(x), then the intermediates q, k, v and y
        (see forward). `cache` is None (training: full causal attention) or a list [k, v]
        (generation: the keys and values of the earlier positions, None at first; grown by
        torch.cat)."""
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
        return x + self.drop(self.proj(y)), q, k, v, y

    def forward(self, x: torch.Tensor, cache=None):
        # The attention's intermediates stay referenced, in this order, until the block returns,
        # as when attention and MLP were one function: without autograd (generation) that
        # decides when they are freed, so the recorded inference trace depends on it.
        x, q, k, v, y = self.attend(x, cache)
        x = x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))
        return x


class MoE(nn.Module):
    """A mixture-of-experts MLP: a learned router sends each token to its top-k experts (GELU
    MLPs); each expert runs on the tokens gathered for it (index_select, so its batch is however
    many tokens chose it), and its outputs, scaled by the renormalized router probabilities,
    are scattered back with index_add_. Sets `aux_loss` (the Switch Transformer load-balancing
    loss) and `counts` (tokens per expert) on every call."""

    def __init__(self, d_model: int, d_ff: int, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
            for _ in range(experts))
        self.aux_loss = None
        self.counts: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(flat), dim=-1)
        weight, chosen = probs.topk(self.top_k, dim=-1)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        counts = []
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            counts.append(rows.numel())
            if rows.numel() == 0:
                continue
            y = expert(flat.index_select(0, rows)) * weight[rows, slot].unsqueeze(1)
            out.index_add_(0, rows, y)
        n_exp = len(self.experts)
        routed = torch.bincount(chosen.reshape(-1), minlength=n_exp).to(probs.dtype)
        self.aux_loss = n_exp * (routed / chosen.numel() * probs.mean(dim=0)).sum()
        self.counts = counts
        return out.view(shape)


class MoEBlock(Block):
    """A GPT block whose MLP is a mixture of experts."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float, attn_dropout: float,
                 experts: int, top_k: int):
        nn.Module.__init__(self)
        self._init_attention(d_model, heads, dropout, attn_dropout)
        self.moe = MoE(d_model, d_ff, experts, top_k)

    def forward(self, x: torch.Tensor, cache=None):
        x = self.attend(x, cache)[0]
        return x + self.drop(self.moe(self.ln2(x)))


class GPT(nn.Module):
    """A GPT-style decoder. `make_block(i)` builds block i (default: a Block); with
    `checkpointing` set, training runs each block under torch.utils.checkpoint (its
    activations are recomputed in the backward pass instead of kept)."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, d_ff: int,
                 max_len: int, dropout: float, attn_dropout: float = 0.0, make_block=None,
                 checkpointing: bool = False):
        super().__init__()
        if make_block is None:
            def make_block(_):
                return Block(d_model, heads, d_ff, dropout, attn_dropout)
        self.checkpointing = checkpointing
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(make_block(i) for i in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor, caches=None, start: int = 0, last_only: bool = False):
        n = idx.shape[1]
        pos = torch.arange(start, start + n, dtype=torch.long)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for i, block in enumerate(self.blocks):
            if self.checkpointing and self.training and caches is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
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


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by GroupNorm and ReLU."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU())


class UNet(nn.Module):
    """A small UNet: `depth` 2x2 max-pool downsamplings with a DoubleConv at every level
    (channels width, 2*width, ...), then as many 2x2 transposed-convolution upsamplings, each
    concatenated with the skip connection of its level before a DoubleConv; a 1x1 convolution
    gives the per-pixel class logits."""

    def __init__(self, width: int, depth: int, classes: int, groups: int):
        super().__init__()
        chans = [width * 2 ** i for i in range(depth + 1)]
        self.inc = DoubleConv(3, chans[0], groups)
        self.down = nn.ModuleList(DoubleConv(chans[i], chans[i + 1], groups)
                                  for i in range(depth))
        self.upconv = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, 2)
                                    for i in reversed(range(depth)))
        self.up = nn.ModuleList(DoubleConv(2 * chans[i], chans[i], groups)
                                for i in reversed(range(depth)))
        self.outc = nn.Conv2d(chans[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc(x)
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(F.max_pool2d(x, 2))
        for upconv, up in zip(self.upconv, self.up):
            x = up(torch.cat([skips.pop(), upconv(x)], dim=1))
        return self.outc(x)


class EncoderLayer(nn.Module):
    """A post-norm BERT layer: bidirectional self-attention that skips padded keys, then a GELU
    MLP, each followed by dropout, the residual and LayerNorm."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`keep`: (batch, 1, 1, length) booleans, False at padded positions."""
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        y = y.transpose(1, 2).contiguous().view(b, n, c)
        x = self.ln1(x + self.drop(self.proj(y)))
        return self.ln2(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class BERT(nn.Module):
    """A BERT-like encoder with a masked-LM head (dense, GELU, LayerNorm, then the token
    embedding matrix, tied, with its own bias)."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, d_ff: int,
                 max_len: int, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.ln_emb = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, d_ff, dropout)
                                    for _ in range(layers))
        self.mlm_dense = nn.Linear(d_model, d_model)
        self.mlm_ln = nn.LayerNorm(d_model)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab))
        # BERT's initialization of the embeddings (N(0, 1) tied to the output gives huge logits).
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        pos = torch.arange(n, dtype=torch.long)
        x = self.drop(self.ln_emb(self.tok(idx) + self.pos(pos)))
        for layer in self.layers:
            x = layer(x, keep)
        h = self.mlm_ln(F.gelu(self.mlm_dense(x)))
        return F.linear(h, self.tok.weight, self.mlm_bias)


# ---------------------------------------------------------------------------------------------
# Workloads: each runs entirely inside the profiler (model construction included).


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_transformer(args) -> dict:
    return _train_gpt(args, checkpointing=False)


def _train_gpt(args, checkpointing: bool) -> dict:
    """The GPT decoder trained with AdamW, sequence length random per step (transformer and
    checkpoint)."""
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = GPT(args.vocab, args.d_model, args.layers, args.heads, 4 * args.d_model,
                args.max_seq, args.dropout, args.attn_dropout, checkpointing=checkpointing)
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


def run_checkpoint(args) -> dict:
    """run_transformer's model and loop, with every block under activation checkpointing."""
    return _train_gpt(args, checkpointing=True)


def run_moe(args) -> dict:
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    def make_block(_):
        return MoEBlock(args.d_model, args.heads, args.d_ff, args.dropout, 0.0, args.experts,
                        args.top_k)

    model = GPT(args.vocab, args.d_model, args.layers, args.heads, args.d_ff, args.max_seq,
                args.dropout, make_block=make_block)
    moes = [block.moe for block in model.blocks]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, foreach=True)
    model.train()
    lengths, expert_tokens = [], []
    for step in range(args.steps):
        n = rng.randint(args.min_seq, args.max_seq)
        lengths.append(n)
        data = torch.randint(args.vocab, (args.batch, n + 1), generator=gen)
        inp, tgt = data[:, :-1], data[:, 1:]
        logits = model(inp)
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), tgt.reshape(-1))
        aux = sum(m.aux_loss for m in moes)
        total = loss + args.aux_weight * aux
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        counts = [m.counts for m in moes]
        expert_tokens.append(counts)
        log(f"  step {step + 1}/{args.steps}: seq {n}, loss {loss.item():.3f}, "
            f"tokens per expert (layer 0) {counts[0]}")
        for m in moes:
            m.aux_loss = None
        del data, inp, tgt, logits, loss, aux, total
    return {"params": sum(p.numel() for p in model.parameters()), "seq_lengths": lengths,
            "expert_tokens": expert_tokens}


def run_unet(args) -> dict:
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = UNet(args.width, args.depth, args.classes, args.groups)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, foreach=True)
    model.train()
    # Image sides must divide by 2**depth.
    unit = 2 ** args.depth
    sides = list(range(-(-args.min_image // unit) * unit, args.max_image + 1, unit))
    shapes = []
    for step in range(args.steps):
        b = rng.randint(args.min_batch, args.max_batch)
        s = rng.choice(sides)
        shapes.append([b, s])
        x = torch.randn(b, 3, s, s, generator=gen)
        y = torch.randint(args.classes, (b, s, s), generator=gen)
        logits = model(x)
        # Cross-entropy per pixel plus a soft Dice loss over the classes.
        ce = F.cross_entropy(logits, y)
        probs = F.softmax(logits, dim=1)
        onehot = F.one_hot(y, args.classes).permute(0, 3, 1, 2).to(probs.dtype)
        inter = (probs * onehot).sum(dim=(0, 2, 3))
        union = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
        dice = 1 - ((2 * inter + 1) / (union + 1)).mean()
        loss = ce + dice
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log(f"  step {step + 1}/{args.steps}: batch {b}, image {s}x{s}, loss {loss.item():.3f}")
        del x, y, logits, ce, probs, onehot, inter, union, dice, loss
    return {"params": sum(p.numel() for p in model.parameters()), "batch_and_side": shapes}


def run_bert(args) -> dict:
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = BERT(args.vocab, args.d_model, args.layers, args.heads, 4 * args.d_model,
                 args.max_len, args.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)
    model.train()
    pad_id, mask_id, first_id = 0, 1, 2  # ids below first_id are special
    lo, hi = math.log(args.min_len), math.log(args.max_len)
    all_lengths, padded = [], []
    for step in range(args.steps):
        # Log-uniform lengths (short sequences common, long ones rare), padded to the longest.
        lengths = [min(args.max_len, round(math.exp(rng.uniform(lo, hi))))
                   for _ in range(args.batch)]
        n = max(lengths)
        all_lengths.append(lengths)
        padded.append(n)
        keep = torch.arange(n).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # (batch, n)
        ids = torch.randint(first_id, args.vocab, (args.batch, n), generator=gen)
        ids = ids.masked_fill(~keep, pad_id)
        # BERT's masking: of the real tokens, mask_prob are predicted; of those, 80% become
        # [MASK], 10% a random token, 10% stay.
        chosen = (torch.rand(args.batch, n, generator=gen) < args.mask_prob) & keep
        labels = ids.masked_fill(~chosen, -100)
        r = torch.rand(args.batch, n, generator=gen)
        rand_ids = torch.randint(first_id, args.vocab, (args.batch, n), generator=gen)
        inp = torch.where(chosen & (r < 0.8), torch.full_like(ids, mask_id), ids)
        inp = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_ids, inp)
        logits = model(inp, keep.view(args.batch, 1, 1, n))
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), labels.reshape(-1),
                               ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log(f"  step {step + 1}/{args.steps}: padded length {n}, {int(keep.sum())} real tokens, "
            f"{int(chosen.sum())} predicted, loss {loss.item():.3f}")
        del keep, ids, chosen, labels, r, rand_ids, inp, logits, loss
    return {"params": sum(p.numel() for p in model.parameters()), "padded_lengths": padded,
            "seq_lengths": all_lengths}


WORKLOADS = {"transformer": run_transformer, "cnn": run_cnn, "inference": run_inference,
             "checkpoint": run_checkpoint, "moe": run_moe, "unet": run_unet, "bert": run_bert}


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

    k = sub.add_parser("checkpoint", parents=[common], help="the transformer workload with "
                       "activation checkpointing per block")
    k.add_argument("--steps", type=int, default=12)
    k.add_argument("--batch", type=int, default=12)
    k.add_argument("--min-seq", type=int, default=64)
    k.add_argument("--max-seq", type=int, default=512)
    k.add_argument("--vocab", type=int, default=8192)
    k.add_argument("--d-model", type=int, default=512)
    k.add_argument("--layers", type=int, default=6)
    k.add_argument("--heads", type=int, default=8)
    k.add_argument("--dropout", type=float, default=0.1, help="residual and MLP dropout")
    k.add_argument("--attn-dropout", type=float, default=0.0, help="attention dropout")

    m = sub.add_parser("moe", parents=[common], help="GPT-style decoder with mixture-of-experts "
                       "MLPs, top-k routing")
    m.add_argument("--steps", type=int, default=16)
    m.add_argument("--batch", type=int, default=8)
    m.add_argument("--min-seq", type=int, default=64)
    m.add_argument("--max-seq", type=int, default=256)
    m.add_argument("--vocab", type=int, default=8192)
    m.add_argument("--d-model", type=int, default=256)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--d-ff", type=int, default=1024, help="hidden width of each expert")
    m.add_argument("--experts", type=int, default=8)
    m.add_argument("--top-k", type=int, default=2, help="experts per token")
    m.add_argument("--aux-weight", type=float, default=0.01,
                   help="weight of the load-balancing loss")
    m.add_argument("--dropout", type=float, default=0.1, help="residual and MLP dropout")

    u = sub.add_parser("unet", parents=[common], help="UNet segmentation training, variable "
                       "image size and batch")
    u.add_argument("--steps", type=int, default=16)
    u.add_argument("--min-batch", type=int, default=4)
    u.add_argument("--max-batch", type=int, default=12)
    u.add_argument("--min-image", type=int, default=64, help="smallest image side (pixels)")
    u.add_argument("--max-image", type=int, default=160, help="largest image side (pixels); "
                   "sides are multiples of 2**depth")
    u.add_argument("--width", type=int, default=32, help="channels of the first level")
    u.add_argument("--depth", type=int, default=4, help="downsamplings")
    u.add_argument("--groups", type=int, default=8, help="GroupNorm groups")
    u.add_argument("--classes", type=int, default=8)

    b = sub.add_parser("bert", parents=[common], help="BERT-like encoder, masked-LM training "
                       "with dynamic padding")
    b.add_argument("--steps", type=int, default=12)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--min-len", type=int, default=8)
    b.add_argument("--max-len", type=int, default=512)
    b.add_argument("--mask-prob", type=float, default=0.15, help="share of tokens predicted")
    b.add_argument("--vocab", type=int, default=8192)
    b.add_argument("--d-model", type=int, default=512)
    b.add_argument("--layers", type=int, default=6)
    b.add_argument("--heads", type=int, default=8)
    b.add_argument("--dropout", type=float, default=0.1)
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
