"""Configuration and environment, each in a fresh process (the allocator reads them once)."""

from __future__ import annotations

import json

import pytest
from support import check, run_python

PROBE = """
import json, tessera
lib = tessera.load()
out = {{}}
def attempt(name, fn):
    try:
        out[name] = ["ok", fn()]
    except tessera.TesseraError as e:
        out[name] = [e.code.name, e.message]
{body}
print(json.dumps(out))
"""


def probe(body: str, **env: str | None) -> dict[str, list]:
    """Runs ``body`` (with ``lib`` and ``attempt(name, fn)``) in a fresh process; returns what
    each attempt gave: ["ok", value] or [error code name, message]."""
    return json.loads(check(run_python(PROBE.format(body=body), env)).splitlines()[-1])


@pytest.mark.parametrize(
    "conf, fragment",
    [
        ("no_such_key:1", "no_such_key"),
        ("limit:8XB", "8XB"),
        ("limit", "limit"),
        ("backend:nonsense", "nonsense"),
    ],
)
def test_configure_rejects_a_bad_string(conf, fragment):
    out = probe(f"attempt('configure', lambda: lib.configure({conf!r}))\nattempt('count', lib.device_count)")
    code, message = out["configure"]
    assert code == "CONFIG" and fragment in message
    assert out["count"] == ["ok", 2]  # the allocator is still usable, with the defaults


def test_configure_before_the_first_allocation_applies():
    out = probe(
        """
attempt('configure', lambda: lib.configure('limit:64MiB,page_size:2MiB'))
attempt('limit', lambda: lib.stats(0)['limit_bytes'])
attempt('big', lambda: lib.malloc(100 << 20, 0))
attempt('small', lambda: lib.free(lib.malloc(32 << 20, 0)))
attempt('again', lambda: lib.configure('limit:1GiB'))
"""
    )
    assert out["configure"] == ["ok", None]
    assert out["limit"] == ["ok", 64 << 20]
    assert out["big"][0] == "OUT_OF_MEMORY" and out["big"][1].startswith("CUDA out of memory.")
    assert out["small"] == ["ok", None]
    assert out["again"][0] == "CONFIG"


def test_configure_after_the_first_allocation_is_refused():
    out = probe(
        """
attempt('malloc', lambda: lib.free(lib.malloc(1 << 20, 0)))
attempt('configure', lambda: lib.configure('limit:64MiB'))
attempt('limit', lambda: lib.stats(0)['limit_bytes'])
"""
    )
    assert out["configure"][0] == "CONFIG"
    assert out["limit"] == ["ok", None]


def test_tessera_conf_from_the_environment():
    out = probe("attempt('limit', lambda: lib.stats(1)['limit_bytes'])", TESSERA_CONF="limit:96MiB")
    assert out["limit"] == ["ok", 96 << 20]
    bad = probe("attempt('malloc', lambda: lib.malloc(1 << 20, 0))", TESSERA_CONF="limit:lots")
    assert bad["malloc"][0] == "CONFIG" and "lots" in bad["malloc"][1]


def test_another_simulated_machine():
    out = probe(
        """
attempt('count', lib.device_count)
attempt('fits', lambda: lib.free(lib.malloc(200 << 20, 2)))
attempt('too_big', lambda: lib.malloc(300 << 20, 2))
""",
        TESSERA_SIM="devices:3,capacity:256MiB,granularity:2MiB",
    )
    assert out["count"] == ["ok", 3]
    assert out["fits"] == ["ok", None]
    assert out["too_big"][0] == "OUT_OF_MEMORY"


def test_bad_driver_fails_every_call_cleanly():
    out = probe(
        "attempt('count', lib.device_count)\nattempt('malloc', lambda: lib.malloc(1 << 20, 0))",
        TESSERA_DRIVER="bogus",
    )
    assert out["count"][0] == "CONFIG" and out["malloc"][0] == "CONFIG"


def test_cuda_driver_without_a_gpu_fails_cleanly():
    """On a machine without a GPU the default driver gives DRIVER errors, never a crash."""
    out = probe(
        "attempt('count', lib.device_count)\nattempt('malloc', lambda: lib.free(lib.malloc(1 << 20, 0)))",
        TESSERA_DRIVER=None,
        TESSERA_SIM=None,
    )
    if out["count"][0] == "ok":
        pytest.skip(f"a CUDA device is present ({out['count'][1]} device(s))")
    assert out["count"][0] == "DRIVER" and out["malloc"][0] == "DRIVER"


def test_trace_is_flushed_at_exit(tmp_path):
    """TESSERA_TRACE through the library: every event is in the file once the process exits
    normally, without any explicit flush (an exit handler writes the buffer out)."""
    trace = tmp_path / "run-%p.csv"
    result = check(
        run_python(
            """
            import os, tessera
            lib = tessera.load()
            ptrs = [lib.malloc(n, 1) for n in (4096, 3 << 20, 700)]
            for p in ptrs:
                lib.free(p, 1)
            print(os.getpid())
            """,
            {"TESSERA_TRACE": str(trace)},
        )
    )
    pid = result.split()[-1]
    lines = (tmp_path / f"run-{pid}.csv").read_text().splitlines()
    events = [line for line in lines if not line.startswith("#")]
    assert [e.split(",")[0] for e in events] == ["a", "a", "a", "f", "f", "f"], lines
    assert [int(e.split(",")[2]) for e in events[:3]] == [4096, 3 << 20, 700]
