#!/usr/bin/env python3
"""Writes tests/data/snapshot_small.pickle: a small PyTorch memory snapshot for the trace reader tests.

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

    line  entry                                   op                      problem
     1    segment_alloc SEG1 20 MiB, stream 0     -                       reserved += 20 MiB
     2    alloc SEG1        4 MiB, stream 0       Alloc slot 0, 4194304, S0
     3    alloc SEG1+4MiB   8 MiB, stream 0       Alloc slot 1, 8388608, S0
     4    free_requested SEG1                     -
     5    free_completed SEG1                     Free slot 0
     6    free_completed SEG0 (before recording)  -                       free of unknown address
     7    segment_alloc SEG2 2 MiB, SIDE stream   -                       reserved += 2 MiB
     8    alloc SEG2        512 B, SIDE           Alloc slot 0, 512, S1
     9    alloc SEG2+512   1024 B, SIDE           Alloc slot 2, 1024, S1
    10    oom (device_free, no addr)              -
    11    snapshot                                -
    12    alloc SEG1        1 MiB, stream 0       Alloc slot 3, 1048576, S0
    13    free_requested SEG2                     -
    14    free_completed SEG2                     Free slot 0
    15    free_completed SEG1+4MiB                Free slot 1
    16    free_requested SEG2+512                 -
    17    free_completed SEG2+512                 Free slot 2
    18    segment_free SEG2 2 MiB                 -                       reserved -= 2 MiB
    19    alloc SEG1+4MiB   2 MiB, stream 0       Alloc slot 2, 2097152, S0  (free list: last freed first)
    20    annotate SEG1 (an action this reader does not know: ignored)
    21    free_completed SEG1                     Free slot 3

    11 events, slots = 4, streams = [0, SIDE_STREAM], problems = [line 6].
    Reserved: device 0's segments at dump time are SEG0 (20 MiB) and SEG1 (20 MiB) = 40 MiB; the
    segment events sum to +20 MiB, so the trace starts at 20 MiB. Recorded points (event = ops
    emitted before the point; a later point at the same event replaces an earlier one):
        start          {event 0, 20971520}
        line 1  (+20M) {event 0, 41943040}  replaces the start point
        line 7  (+2M)  {event 3, 44040192}
        line 18 (-2M)  {event 9, 41943040}
    => recorded = [(0, 41943040), (3, 44040192), (9, 41943040)]

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


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "data", "snapshot_small.pickle")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = pickle.dumps(snapshot(), protocol=4)
    with open(path, "wb") as f:
        f.write(data)
    print(f"wrote {path} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
