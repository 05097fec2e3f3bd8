"""``tessera replay --export`` opened by PyTorch's own viewer (``python -m torch.cuda._memory_viz``):
its parsers read every export (``stats``: segments and blocks; ``trace``: the events), what they
print agrees with the replay, ``trace_plot`` writes the HTML page, and tessera's own reader reads
each export back to the replay's peaks. Also the live allocator's snapshot through
``torch.cuda.memory._snapshot`` / ``_dump_snapshot``. Needs torch (no GPU) and the ``tessera``
command (the installed one, else ``cargo build``'s; ``TESSERA_BIN`` names another)."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, MiB, import_torch, tessera_command

torch = import_torch()
from torch.cuda import _memory_viz  # noqa: E402
from torch.cuda._memory_viz import Bytes  # noqa: E402

FIXTURES = ["small", "preexisting", "wrapped", "expandable", "bad", "retry", "oldformat"]
POLICIES = ["tessera", "legacy", "native", "expandable"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def load(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def memory_viz(*args: str) -> str:
    """``python -m torch.cuda._memory_viz ARGS`` (a second or two each: torch is imported)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "torch.cuda._memory_viz", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, f"_memory_viz {args}: exit {result.returncode}\n{result.stderr}"
    return result.stdout


def replay_json(*args: str) -> list[dict]:
    out = run(str(tessera_command()), "replay", *args, "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module", params=[None, 26 * MiB], ids=["80GiB", "26MiB"])
def exported(request, tmp_path_factory):
    """Every fixture replayed through every policy (ample memory, and too little for some), and
    exported: [(fixture, row, export path)]."""
    capacity = request.param
    out = tmp_path_factory.mktemp("export")
    cases = []
    for name in FIXTURES:
        fixture = REPO / "tests" / "data" / f"snapshot_{name}.pickle"
        args = [str(fixture), "--device", "all", "--export", str(out)]
        if capacity:
            args += ["--capacity", f"{capacity}B"]
        for row in replay_json(*args):
            if row["policy"] == "recorded":
                continue
            device = row["device"]
            path = out / f"snapshot_{name}.pickle.device{device}.{row['policy']}.pickle"
            assert path.exists(), sorted(p.name for p in out.iterdir())
            cases.append((name, row, path))
    assert len(cases) == 9 * len(POLICIES)  # seven fixtures, two of them with two devices
    return cases


def test_memory_viz_stats_reads_every_export(exported):
    for name, row, path in exported:
        snap = load(path)
        assert path.read_bytes()[:2] == b"\x80\x04", "protocol 4, as _dump_snapshot writes"
        # What `python -m torch.cuda._memory_viz stats FILE` prints, in this process.
        text = _memory_viz.segsum(load(path))
        segments = snap["segments"]
        reserved = sum(s["total_size"] for s in segments)
        allocated = sum(
            b["requested_size"] for s in segments for b in s["blocks"] if b["state"] == "active_allocated"
        )
        assert f"segments: {len(segments)}\n" in text, (name, row["policy"], text)
        assert f"total_reserved: {Bytes(reserved)}\n" in text, (name, row["policy"], text)
        assert f"total_allocated: {Bytes(allocated)}\n" in text, (name, row["policy"], text)
        # The blocks live at the end are the trace's live allocations, at the policy's addresses.
        trace = snap["device_traces"][row["device"]]
        live: dict[int, int] = {}
        for e in trace:
            if e["action"] == "alloc":
                live[e["addr"]] = e["size"]
            elif e["action"] == "free_completed":
                live.pop(e["addr"])
        active = {b["address"]: b["requested_size"] for s in segments for b in s["blocks"] if b["state"] == "active_allocated"}
        assert active == live, (name, row["policy"])


def test_memory_viz_trace_prints_every_event_of_the_replay(exported):
    for name, row, path in exported:
        # What `python -m torch.cuda._memory_viz trace FILE` prints, in this process.
        text = _memory_viz.trace(load(path))
        trace = load(path)["device_traces"][row["device"]]
        lines = text.splitlines()
        assert f"Device {row['device']} ----------------" in text
        assert f"{len(trace)} entries" in lines, (name, row["policy"])
        body = [line for line in lines[2:] if not line.startswith("TOTAL MEM")]
        assert len(body) == len(trace), (name, row["policy"])
        count = lambda pattern: sum(1 for line in body if re.match(pattern, line))  # noqa: E731
        calls = row["driver_calls"]
        assert count(r"\w+ = (seg_\d+|MEM|\w+)\[") == sum(1 for e in trace if e["action"] == "alloc")
        assert count(r"del ") == count(r"# free completed for ")
        # The replay's own figures: OOMs, and the policy's cuMemAlloc / cuMemFree calls.
        assert count(r"raise OutOfMemoryError") == row["ooms"], (name, row["policy"])
        mallocs, frees = count(r"\w+ = cudaMalloc\("), count(r"cudaFree\(")
        maps = sum(1 for e in trace if e["action"] == "segment_map")
        unmaps = sum(1 for e in trace if e["action"] == "segment_unmap")
        assert (mallocs, frees, maps, unmaps) == tuple(
            sum(1 for e in trace if e["action"] == a)
            for a in ("segment_alloc", "segment_free", "segment_map", "segment_unmap")
        )
        # Driver calls count failed calls too: with no OOM, every call succeeded.
        figures = [calls.get(c, 0) for c in ("cuMemAlloc", "cuMemFree", "cuMemMap", "cuMemUnmap")]
        if row["ooms"] == 0:
            assert [mallocs, frees, maps, unmaps] == figures, (name, row["policy"])
        else:
            assert all(a <= b for a, b in zip([mallocs, frees, maps, unmaps], figures))


def test_memory_viz_trace_plot_writes_the_page(exported, tmp_path):
    for name, row, path in exported:
        page = _memory_viz.trace_plot(load(path))
        assert "MemoryViz.js" in page and '"base64"' in page, (name, row["policy"])
        assert "MemoryViz.js" in _memory_viz.segment_plot(load(path))
    # And through the command line, as a user runs it, on one export of each policy.
    for name, row, path in exported[: len(POLICIES)]:
        html = tmp_path / f"{path.stem}.html"
        memory_viz("trace_plot", str(path), "-o", str(html))
        assert '"base64"' in html.read_text(), (name, row["policy"])
    name, row, path = exported[0]
    assert "total_reserved: " in memory_viz("stats", str(path))
    assert " entries\n" in memory_viz("trace", str(path))


def test_tessera_reads_every_export_back_to_the_replays_peaks(exported):
    for name, row, path in exported:
        rows = replay_json(str(path), "--device", str(row["device"]), "--policy", "native")
        recorded = rows[-1]
        assert recorded["policy"] == "recorded"
        assert recorded["reconstructed_blocks"] == 0, "every live block is in the exported trace"
        assert recorded["peak_live_bytes"] == row["peak_live_bytes"], (name, row["policy"])
        assert recorded["ooms"] == row["ooms"], (name, row["policy"])
        if row["policy"] == "tessera":
            # Mapped bytes only: tessera may also hold created pages that are mapped nowhere.
            assert recorded["peak_reserved_bytes"] <= row["peak_reserved_bytes"]
        else:
            assert recorded["peak_reserved_bytes"] == row["peak_reserved_bytes"], (name, row["policy"])
        assert recorded["models_recorded"] == ("expandable" if row["policy"] == "expandable" else "native")


def test_the_live_allocators_snapshot_through_torch(lib, tmp_path):
    """With tessera enabled, torch.cuda.memory._snapshot() and _dump_snapshot() (which raise for a
    pluggable allocator) give tessera's segments, and PyTorch's viewer reads them."""
    import tessera.torch as tt

    tt.enable(oom_error="runtime")
    p = lib.malloc(5 * MiB, 0)
    try:
        snap = torch.cuda.memory._snapshot()
        assert snap == lib.memory_snapshot()
        assert any(b["address"] == p and b["requested_size"] == 5 * MiB for s in snap["segments"] for b in s["blocks"])
        assert torch.cuda.memory_snapshot() == snap["segments"]
        path = tmp_path / "live.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        text = memory_viz("stats", str(path))
        reserved = sum(s["total_size"] for s in snap["segments"])
        assert f"total_reserved: {Bytes(reserved)}\n" in text, text
        assert f"segments: {len(snap['segments'])}\n" in text, text
        rows = replay_json(str(path), "--device", "all", "--policy", "native")
        assert any(r["policy"] == "recorded" and r["reconstructed_blocks"] >= 1 for r in rows)
    finally:
        lib.free(p, 0)
