#!/usr/bin/env python3
"""Writes tests/data/snapshot_*.pickle: small PyTorch memory snapshots for the trace reader tests.

Pure Python (stdlib `pickle` only, no torch), deterministic: running it again writes the same bytes.
Run it from anywhere: `python3 scripts/make_snapshot_fixture.py`.

The structure follows what `torch.cuda.memory._dump_snapshot()` writes: `pickle.dump()` of the dict
that `torch._C._cuda_memorySnapshot()` builds (torch/csrc/cuda/Module.cpp, and before it
torch/csrc/cuda/memory_snapshot.cpp; the TypedDicts are documented in `torch.cuda.memory._snapshot`):

    {'segments': [{'device', 'address', 'total_size', 'allocated_size', 'active_size',
                   'requested_size', 'stream', 'segment_type', 'segment_pool_id', 'is_expandable',
                   'frames', 'blocks': [{'address', 'size', 'requested_size', 'state', 'frames'}]}],
     'device_traces': [[{'action', 'addr' (or 'device_free' for 'oom'), 'size', 'stream', 'time_us',
                         'frames', 'compile_context', 'user_metadata'}], ...],   # one list per device
     'allocator_settings': {...}}

Frames are dicts {'filename', 'line', 'name'}; PyTorch shares one frames list among the entries with
the same traceback (and one dict among the tracebacks with the same frame), so pickle writes each
once and refers back to it (its memo), as here: serde-pickle 1.2 reports such shared containers
holding shared items as "recursive structure found" unless told to replace them. Python 3.11's
default protocol (4, as `_dump_snapshot` uses with Python 3.8 to 3.13) is pinned so that the bytes do
not depend on the Python version.

Expected results (the Rust tests in tests/trace_parser.rs check exactly these)
------------------------------------------------------------------------------
Device 0 (line = 1-based index of the entry in device_traces[0]; S = stream index):

    line  entry                                   op
     0    (reconstructed: SEG0 6 MiB, freed at 6) Alloc slot 0, 6291456, S0
     1    segment_alloc SEG1 20 MiB, stream 0     -                       reserved += 20 MiB
     2    alloc SEG1        4 MiB, stream 0       Alloc slot 1, 4194304, S0
     3    alloc SEG1+4MiB   8 MiB, stream 0       Alloc slot 2, 8388608, S0
     4    free_requested SEG1                     -
     5    free_completed SEG1                     Free slot 1
     6    free_completed SEG0 (before recording)  Free slot 0
     7    segment_alloc SEG2 2 MiB, SIDE stream   -                       reserved += 2 MiB
     8    alloc SEG2        512 B, SIDE           Alloc slot 0, 512, S1  (free list: last freed first)
     9    alloc SEG2+512   1024 B, SIDE           Alloc slot 1, 1024, S1
    10    oom (device_free 123 MiB, 64 MiB)       - (a recorded OOM: entry 10, 64 MiB asked, 123 MiB free)
    11    snapshot                                -
    12    alloc SEG1        1 MiB, stream 0       Alloc slot 3, 1048576, S0
    13    free_requested SEG2                     -
    14    free_completed SEG2                     Free slot 0
    15    free_completed SEG1+4MiB                Free slot 2
    16    free_requested SEG2+512                 -
    17    free_completed SEG2+512                 Free slot 1
    18    segment_free SEG2 2 MiB                 -                       reserved -= 2 MiB
    19    alloc SEG1+4MiB   2 MiB, stream 0       Alloc slot 1, 2097152, S0
    20    annotate SEG1 (an action this reader does not know: ignored)
    21    free_completed SEG1                     Free slot 3

    13 events (1 reconstructed: 6 MiB), slots = 4, streams = [0, SIDE_STREAM], no problems.
    Peak live: 6 + 4 + 8 MiB = 18 MiB after line 3.
    Reserved: device 0's segments at dump time are SEG0 (20 MiB) and SEG1 (20 MiB) = 40 MiB; the
    segment events sum to +20 MiB, so the trace starts at 20 MiB. Recorded points (event = ops
    emitted before the point; a later point at the same event replaces an earlier one):
        start          {event 0, 20971520}
        line 1  (+20M) {event 1, 41943040}
        line 7  (+2M)  {event 5, 44040192}
        line 18 (-2M)  {event 11, 41943040}
    => recorded = [(0, 20971520), (1, 41943040), (5, 44040192), (11, 41943040)], peak 42 MiB.
    Settings: allocator_settings, expandable_segments False: modelled by `native`.

Device 1 (expandable segments: segment_map / segment_unmap):

    line  entry                          op
     1    segment_map EXP 2 MiB          -            reserved += 2 MiB
     2    alloc EXP 1 MiB, stream 0      Alloc slot 0, 1048576, S0
     3    free_requested EXP             -
     4    free_completed EXP             Free slot 0
     5    segment_unmap EXP 2 MiB        -            reserved -= 2 MiB
     6    segment_map EXP 2 MiB          -            reserved += 2 MiB
     7    alloc EXP 4096 B, stream 0     Alloc slot 0, 4096, S0

    3 events, slots = 1, streams = [0], no problems. Device 1's segment at dump time: EXP, 2 MiB; the
    segment events sum to +2 MiB, so the trace starts at 0:
        start {0, 0}; line 1 {0, 2097152} (replaces it); line 5 {2, 0}; line 6 {2, 2097152} (replaces it)
    => recorded = [(0, 2097152), (2, 2097152)]

Device 2 does not exist: the snapshot has traces for 2 devices.

The other fixtures (each tests/data/snapshot_<name>.pickle; tests/snapshot_fixtures.rs checks every
figure below, and the replay's peak live and recorded peak reserved):

preexisting (native; memory live before recording both ways)
    Segments at dump: A 20 MiB [A 8 MiB allocated, A+8M 4 MiB inactive, A+12M 8 MiB inactive];
    B 2 MiB small [B 512 B allocated (requested 400), rest inactive]; C 20 MiB [C 6 MiB allocated,
    rest inactive].
    1 segment_alloc C 20M; 2 alloc C 6M; 3 alloc C+6M 2M; 4 free_requested A+8M 4M;
    5 free_completed A+8M 4M; 6 free_requested C+6M; 7 free_completed C+6M; 8 snapshot.
    Reconstructed: A (8 MiB) and B (400 B) from the segments, A+8M (4 MiB) from its free: 3 blocks,
    12 MiB + 400 B. Live: 12M+400 -> +6M -> +2M = 20 MiB + 400 B (peak, after line 3) -> 16M+400
    -> 14M+400. Reserved: 42 MiB at dump, +20 MiB of segment events: starts at 22 MiB, 42 MiB
    after line 1 (peak 42 MiB). recorded = [(0, 22 MiB), (3, 42 MiB)]. 3 + 4 = 7 events.

wrapped (native; the ring buffer wrapped: the trace starts mid-run)
    Segments at dump: D 20 MiB [D 10 MiB allocated, D+10M 10 MiB inactive]; E 20 MiB [inactive].
    1 free_completed D+10M 10M (its free_requested was dropped); 2 free_requested E 5M;
    3 free_completed E 5M; 4 free_completed F 2M; 5 segment_free F 20M (F's segment_alloc was
    dropped); 6 alloc E 3M; 7 free_requested E; 8 free_completed E; 9 alloc D+10M 1M;
    10 free_requested D+10M; 11 free_completed D+10M.
    Reconstructed: D (segments), D+10M, E, F (frees): 4 blocks, 27 MiB (F lies in a segment the
    trace frees, so it was reserved at the start). Live: 27 MiB at the start (the peak) -> 17 -> 12
    -> 10 -> 13 -> 10 -> 11 -> 10. Reserved: 40 MiB at dump, -20 MiB of segment events: 60 MiB at
    the start (the peak), 40 MiB after line 5. recorded = [(0, 60 MiB), (7, 40 MiB)]. 11 events.

expandable (two devices; allocator_settings with expandable_segments True; every action)
    Device 0, segment at dump: X 4 MiB expandable [X 1 MiB allocated, X+1M 3 MiB inactive].
    1 segment_map X 2M; 2 alloc X 1M; 3 segment_map X+2M 2M; 4 alloc X+1M 3M;
    5 oom 8 MiB asked, device_free 1 MiB; 6 free_requested X+1M; 7 free_completed X+1M; 8 snapshot;
    9 segment_unmap X+2M 2M; 10 segment_map X+2M 2M; 11 annotate (ignored).
    3 events, no reconstruction. Live: 1 -> 4 MiB (peak) -> 1. Reserved: 4 MiB at dump, +4 MiB of
    segment events: 0 at the start, 2, 4 (peak), 2, 4. Points: line 1 replaces the start at event 0,
    line 3 at event 1, lines 9 and 10 both at event 3 (the later stays):
    recorded = [(0, 2 MiB), (1, 4 MiB), (3, 4 MiB)]. Recorded OOM: entry 5, 8 MiB asked for, 1 MiB
    free. Modelled by `expandable`.
    Device 1: Y 2 MiB small [Y 512 B allocated, rest inactive]; 1 alloc Y+512 1024 B;
    2 free_requested; 3 free_completed. Reconstructed 1 block (512 B); peak live 1536 B;
    reserved 2 MiB throughout (no segment events): recorded = [(0, 2 MiB)].

bad (native; bad input, each named, counted and skipped)
    Segments at dump: S 20 MiB [S 4 MiB allocated, S+4M 16 MiB inactive]; T 2 MiB [T 512 B
    allocated, rest inactive].
    1 segment_alloc T 2M; 2 alloc S+4M 2M; 3 alloc S+5M 1M (overlaps S+4M: dropped);
    4 free_completed S+5M (its alloc was dropped); 5 free_requested S+4M; 6 free_completed S+4M;
    7 free_completed S+4M (a double free); 8 free_completed Z 1M (no segment held Z);
    9 alloc S+8M 0 B.
    Problems: line 0 (the block at T is allocated at dump, but T was allocated during the trace and
    the trace never allocates the block), lines 3, 4, 7, 8, 9. Reconstructed: S (4 MiB). Events:
    3. Live: 4 -> 6 MiB (peak) -> 4. Reserved: 22 MiB at dump, +2 MiB: 20 MiB at the start, 22
    after line 1 (peak). recorded = [(0, 20 MiB), (1, 22 MiB)].

retry (native; the recorded run at its device's limit: a cudaMalloc failed, the cache was
released and the allocation retried)
    Segments at dump: R1 20 MiB [R1 15 MiB allocated, rest inactive]; R2 30 MiB [allocated].
    1 segment_alloc R0 20M; 2 alloc R0 10M; 3 free_requested R0; 4 free_completed R0;
    5 segment_alloc R1 20M; 6 alloc R1 15M; 7 segment_free R0 20M; 8 segment_alloc R2 30M;
    9 alloc R2 30M.
    4 events, nothing reconstructed. Live: 10 -> 0 -> 15 -> 45 MiB (peak). Reserved: 50 MiB at dump,
    +50 MiB of segment events: 0 at the start, 20, 40, 20, 50 (peak). recorded = [(0, 20 MiB),
    (2, 40 MiB), (3, 50 MiB)] (line 7's 20 MiB is replaced by line 8's 50 MiB at event 3). One retry: at line 7, 40 MiB reserved, then a 30 MiB segment, so the
    device held less than 70 MiB (and at least the 50 MiB peak).

oldformat (as PyTorch 1.13/2.0 wrote: no allocator_settings, blocks without 'address' or
'requested_size', entries without 'frames' or 'stream', addresses beyond 2^63)
    Segment at dump: G 2 MiB [1024 B allocated, rest inactive] (G = 0xffff800000000000).
    1 alloc G+1024 512 B; 2 free_completed G+1024 (no size).
    Reconstructed: G (1024 B, its size: no requested_size). Peak live 1536 B. Reserved 2 MiB
    throughout: recorded = [(0, 2 MiB)]. Settings inferred: expandable_segments False.
"""

import os
import pickle

MIB = 1 << 20

SEG0 = 0x7F39FE000000  # allocated before recording started
SEG1 = 0x7F3A00000000
SEG2 = 0x7F3A02000000  # a small-pool segment on the side stream, freed during the trace
EXP = 0x7F4000000000  # device 1, expandable segment
SIDE_STREAM = 0x55B8C0E3A000  # a cudaStream_t handle, as an int64
T0 = 1718000000000000  # time_us of the first entry


def frame(filename, line, name):
    return {"filename": filename, "line": line, "name": name}


# As in PyTorch's symbolizer: one dict per distinct frame, shared by the tracebacks that contain
# it; one list per distinct traceback, shared by every entry that has it; one empty list shared by
# the entries without context. Pickle writes each once and refers back to it (its memo).
MAIN_FRAME = frame("train.py", 88, "<module>")
FRAMES_TRAIN = [
    frame("/usr/lib/python3.11/site-packages/torch/nn/modules/linear.py", 125, "forward"),
    frame("train.py", 42, "step"),
    MAIN_FRAME,
]
FRAMES_LOADER = [
    frame("/usr/lib/python3.11/site-packages/torch/utils/data/dataloader.py", 630, "__next__"),
    MAIN_FRAME,
]
FRAMES_NONE = []


def entry(i, action, addr, size, stream, frames, key="addr"):
    return {
        "action": action,
        key: addr,
        "size": size,
        "stream": stream,
        "time_us": T0 + 10 * i,
        "frames": frames,
        "compile_context": "N/A",
        "user_metadata": "",
    }


def device0_trace():
    rows = [
        ("segment_alloc", SEG1, 20 * MIB, 0, FRAMES_TRAIN),
        ("alloc", SEG1, 4 * MIB, 0, FRAMES_TRAIN),
        ("alloc", SEG1 + 4 * MIB, 8 * MIB, 0, FRAMES_TRAIN),
        ("free_requested", SEG1, 4 * MIB, 0, FRAMES_TRAIN),
        ("free_completed", SEG1, 4 * MIB, 0, FRAMES_TRAIN),
        ("free_completed", SEG0, 6 * MIB, 0, FRAMES_NONE),
        ("segment_alloc", SEG2, 2 * MIB, SIDE_STREAM, FRAMES_LOADER),
        ("alloc", SEG2, 512, SIDE_STREAM, FRAMES_LOADER),
        ("alloc", SEG2 + 512, 1024, SIDE_STREAM, FRAMES_LOADER),
        ("oom", 123 * MIB, 64 * MIB, 0, FRAMES_TRAIN),
        ("snapshot", 0, 0, 0, FRAMES_NONE),
        ("alloc", SEG1, 1 * MIB, 0, FRAMES_TRAIN),
        ("free_requested", SEG2, 512, SIDE_STREAM, FRAMES_LOADER),
        ("free_completed", SEG2, 512, SIDE_STREAM, FRAMES_LOADER),
        ("free_completed", SEG1 + 4 * MIB, 8 * MIB, 0, FRAMES_TRAIN),
        ("free_requested", SEG2 + 512, 1024, SIDE_STREAM, FRAMES_LOADER),
        ("free_completed", SEG2 + 512, 1024, SIDE_STREAM, FRAMES_LOADER),
        ("segment_free", SEG2, 2 * MIB, SIDE_STREAM, FRAMES_LOADER),
        ("alloc", SEG1 + 4 * MIB, 2 * MIB, 0, FRAMES_TRAIN),
        ("annotate", SEG1, 1 * MIB, 0, FRAMES_NONE),
        ("free_completed", SEG1, 1 * MIB, 0, FRAMES_TRAIN),
    ]
    out = []
    for i, (action, addr, size, stream, frames) in enumerate(rows):
        # An OOM entry has 'device_free' (what CUDA still reports free) instead of 'addr'.
        key = "device_free" if action == "oom" else "addr"
        out.append(entry(i, action, addr, size, stream, frames, key))
    out[19]["user_metadata"] = "layer=3"
    return out


def device1_trace():
    rows = [
        ("segment_map", EXP, 2 * MIB),
        ("alloc", EXP, 1 * MIB),
        ("free_requested", EXP, 1 * MIB),
        ("free_completed", EXP, 1 * MIB),
        ("segment_unmap", EXP, 2 * MIB),
        ("segment_map", EXP, 2 * MIB),
        ("alloc", EXP, 4096),
    ]
    return [entry(100 + i, a, addr, size, 0, FRAMES_TRAIN) for i, (a, addr, size) in enumerate(rows)]


def block(address, size, requested, state, frames):
    return {
        "address": address,
        "size": size,
        "requested_size": requested,
        "state": state,
        "frames": frames,
    }


def segment(device, address, total, stream, kind, expandable, blocks):
    allocated = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    return {
        "device": device,
        "address": address,
        "total_size": total,
        "allocated_size": allocated,
        "active_size": allocated,
        "requested_size": sum(
            b["requested_size"] for b in blocks if b["state"] == "active_allocated"
        ),
        "stream": stream,
        "segment_type": kind,
        "segment_pool_id": (0, 0),
        "is_expandable": expandable,
        "frames": FRAMES_NONE,
        "blocks": blocks,
    }


def snapshot():
    segments = [
        segment(0, SEG0, 20 * MIB, 0, "large", False, [block(SEG0, 20 * MIB, 0, "inactive", [])]),
        segment(
            0,
            SEG1,
            20 * MIB,
            0,
            "large",
            False,
            [
                block(SEG1, 4 * MIB, 0, "inactive", []),
                block(SEG1 + 4 * MIB, 2 * MIB, 2 * MIB, "active_allocated", FRAMES_TRAIN),
                block(SEG1 + 6 * MIB, 14 * MIB, 0, "inactive", []),
            ],
        ),
        segment(
            1,
            EXP,
            2 * MIB,
            0,
            "large",
            True,
            [
                block(EXP, 4096, 4096, "active_allocated", FRAMES_TRAIN),
                block(EXP + 4096, 2 * MIB - 4096, 0, "inactive", []),
            ],
        ),
    ]
    return {
        "segments": segments,
        "device_traces": [device0_trace(), device1_trace()],
        "allocator_settings": {
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False",
            "max_split_size": -1,
            "garbage_collection_threshold": 0.0,
            "expandable_segments": False,
            "pinned_num_register_threads": 1,
            "release_lock_on_cudamalloc": False,
            "pinned_use_cuda_host_register": False,
            "roundup_power2_divisions": {"1": 0, "2": 0, "4": 0},
        },
        "external_annotations": [],
    }


SETTINGS_NATIVE = {
    "PYTORCH_CUDA_ALLOC_CONF": "",
    "max_split_size": -1,
    "garbage_collection_threshold": 0.0,
    "expandable_segments": False,
    "pinned_num_register_threads": 1,
    "release_lock_on_cudamalloc": False,
    "pinned_use_cuda_host_register": False,
    "roundup_power2_divisions": {"1": 0, "2": 0, "4": 0},
}


def trace_of(rows, base=0):
    """Entries from (action, addr, size[, stream]) rows; 'oom' rows carry device_free as addr."""
    out = []
    for i, row in enumerate(rows):
        action, addr, size = row[:3]
        stream = row[3] if len(row) > 3 else 0
        key = "device_free" if action == "oom" else "addr"
        out.append(entry(base + i, action, addr, size, stream, FRAMES_TRAIN, key))
    return out


def preexisting():
    a, b, c = 0x7F5000000000, 0x7F5002000000, 0x7F5004000000
    segments = [
        segment(0, a, 20 * MIB, 0, "large", False, [
            block(a, 8 * MIB, 8 * MIB, "active_allocated", FRAMES_TRAIN),
            block(a + 8 * MIB, 4 * MIB, 0, "inactive", []),
            block(a + 12 * MIB, 8 * MIB, 0, "inactive", []),
        ]),
        segment(0, b, 2 * MIB, 0, "small", False, [
            block(b, 512, 400, "active_allocated", FRAMES_LOADER),
            block(b + 512, 2 * MIB - 512, 0, "inactive", []),
        ]),
        segment(0, c, 20 * MIB, 0, "large", False, [
            block(c, 6 * MIB, 6 * MIB, "active_allocated", FRAMES_TRAIN),
            block(c + 6 * MIB, 14 * MIB, 0, "inactive", []),
        ]),
    ]
    rows = [
        ("segment_alloc", c, 20 * MIB),
        ("alloc", c, 6 * MIB),
        ("alloc", c + 6 * MIB, 2 * MIB),
        ("free_requested", a + 8 * MIB, 4 * MIB),
        ("free_completed", a + 8 * MIB, 4 * MIB),
        ("free_requested", c + 6 * MIB, 2 * MIB),
        ("free_completed", c + 6 * MIB, 2 * MIB),
        ("snapshot", 0, 0),
    ]
    return {"segments": segments, "device_traces": [trace_of(rows)],
            "allocator_settings": SETTINGS_NATIVE}


def wrapped():
    d, e, f = 0x7F6000000000, 0x7F6002000000, 0x7F6004000000
    segments = [
        segment(0, d, 20 * MIB, 0, "large", False, [
            block(d, 10 * MIB, 10 * MIB, "active_allocated", FRAMES_TRAIN),
            block(d + 10 * MIB, 10 * MIB, 0, "inactive", []),
        ]),
        segment(0, e, 20 * MIB, 0, "large", False, [block(e, 20 * MIB, 0, "inactive", [])]),
    ]
    rows = [
        ("free_completed", d + 10 * MIB, 10 * MIB),
        ("free_requested", e, 5 * MIB),
        ("free_completed", e, 5 * MIB),
        ("free_completed", f, 2 * MIB),
        ("segment_free", f, 20 * MIB),
        ("alloc", e, 3 * MIB),
        ("free_requested", e, 3 * MIB),
        ("free_completed", e, 3 * MIB),
        ("alloc", d + 10 * MIB, 1 * MIB),
        ("free_requested", d + 10 * MIB, 1 * MIB),
        ("free_completed", d + 10 * MIB, 1 * MIB),
    ]
    return {"segments": segments, "device_traces": [trace_of(rows)],
            "allocator_settings": SETTINGS_NATIVE}


def expandable():
    x, y = 0x7F7000000000, 0x7F8000000000
    segments = [
        segment(0, x, 4 * MIB, 0, "large", True, [
            block(x, 1 * MIB, 1 * MIB, "active_allocated", FRAMES_TRAIN),
            block(x + 1 * MIB, 3 * MIB, 0, "inactive", []),
        ]),
        segment(1, y, 2 * MIB, 0, "small", True, [
            block(y, 512, 512, "active_allocated", FRAMES_TRAIN),
            block(y + 512, 2 * MIB - 512, 0, "inactive", []),
        ]),
    ]
    dev0 = [
        ("segment_map", x, 2 * MIB),
        ("alloc", x, 1 * MIB),
        ("segment_map", x + 2 * MIB, 2 * MIB),
        ("alloc", x + 1 * MIB, 3 * MIB),
        ("oom", 1 * MIB, 8 * MIB),
        ("free_requested", x + 1 * MIB, 3 * MIB),
        ("free_completed", x + 1 * MIB, 3 * MIB),
        ("snapshot", 0, 0),
        ("segment_unmap", x + 2 * MIB, 2 * MIB),
        ("segment_map", x + 2 * MIB, 2 * MIB),
        ("annotate", x, 0),
    ]
    dev1 = [
        ("alloc", y + 512, 1024),
        ("free_requested", y + 512, 1024),
        ("free_completed", y + 512, 1024),
    ]
    settings = dict(SETTINGS_NATIVE, expandable_segments=True,
                    PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    return {"segments": segments, "device_traces": [trace_of(dev0), trace_of(dev1, 100)],
            "allocator_settings": settings}


def bad():
    s, t, z = 0x7F9000000000, 0x7F9002000000, 0x7F9100000000
    segments = [
        segment(0, s, 20 * MIB, 0, "large", False, [
            block(s, 4 * MIB, 4 * MIB, "active_allocated", FRAMES_TRAIN),
            block(s + 4 * MIB, 16 * MIB, 0, "inactive", []),
        ]),
        segment(0, t, 2 * MIB, 0, "small", False, [
            block(t, 512, 512, "active_allocated", FRAMES_TRAIN),
            block(t + 512, 2 * MIB - 512, 0, "inactive", []),
        ]),
    ]
    rows = [
        ("segment_alloc", t, 2 * MIB),
        ("alloc", s + 4 * MIB, 2 * MIB),
        ("alloc", s + 5 * MIB, 1 * MIB),
        ("free_completed", s + 5 * MIB, 1 * MIB),
        ("free_requested", s + 4 * MIB, 2 * MIB),
        ("free_completed", s + 4 * MIB, 2 * MIB),
        ("free_completed", s + 4 * MIB, 2 * MIB),
        ("free_completed", z, 1 * MIB),
        ("alloc", s + 8 * MIB, 0),
    ]
    return {"segments": segments, "device_traces": [trace_of(rows)],
            "allocator_settings": SETTINGS_NATIVE}


def retry():
    r0, r1, r2 = 0x7FA000000000, 0x7FA002000000, 0x7FA004000000
    segments = [
        segment(0, r1, 20 * MIB, 0, "large", False, [
            block(r1, 15 * MIB, 15 * MIB, "active_allocated", FRAMES_TRAIN),
            block(r1 + 15 * MIB, 5 * MIB, 0, "inactive", []),
        ]),
        segment(0, r2, 30 * MIB, 0, "large", False, [
            block(r2, 30 * MIB, 30 * MIB, "active_allocated", FRAMES_TRAIN),
        ]),
    ]
    rows = [
        ("segment_alloc", r0, 20 * MIB),
        ("alloc", r0, 10 * MIB),
        ("free_requested", r0, 10 * MIB),
        ("free_completed", r0, 10 * MIB),
        ("segment_alloc", r1, 20 * MIB),
        ("alloc", r1, 15 * MIB),
        ("segment_free", r0, 20 * MIB),
        ("segment_alloc", r2, 30 * MIB),
        ("alloc", r2, 30 * MIB),
    ]
    return {"segments": segments, "device_traces": [trace_of(rows)],
            "allocator_settings": SETTINGS_NATIVE}


def oldformat():
    g = 0xFFFF800000000000
    segments = [{
        "device": 0,
        "address": g,
        "total_size": 2 * MIB,
        "allocated_size": 1024,
        "active_size": 1024,
        "stream": 0,
        "segment_type": "small",
        "blocks": [
            {"size": 1024, "state": "active_allocated", "history": []},
            {"size": 2 * MIB - 1024, "state": "inactive"},
        ],
    }]
    trace = [
        {"action": "alloc", "addr": g + 1024, "size": 512},
        {"action": "free_completed", "addr": g + 1024},
    ]
    return {"segments": segments, "device_traces": [trace]}


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fixtures = {
        "small": snapshot(),
        "preexisting": preexisting(),
        "wrapped": wrapped(),
        "expandable": expandable(),
        "bad": bad(),
        "retry": retry(),
        "oldformat": oldformat(),
    }
    for name, snap in fixtures.items():
        path = os.path.join(root, "tests", "data", f"snapshot_{name}.pickle")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = pickle.dumps(snap, protocol=4)
        with open(path, "wb") as f:
            f.write(data)
        print(f"wrote {path} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
