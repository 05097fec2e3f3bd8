"""Shared test setup: every test runs on tessera's simulated driver (no GPU needed).

The process-wide allocator reads its environment once, at first use, so the variables are set
here, before anything loads the library; tests that need a fresh allocator (configuration, other
simulated machines, enabling too late) run Python in a subprocess through ``run_python``.

The tests run against an installed ``tessera`` (``INSTALLED``: a wheel, with its own library and
command) when there is one, else against the source tree (``python/``, with the library from
``target/`` or ``TESSERA_LIBRARY``); the report header says which.
``TESSERA_TEST_INSTALLED=1`` demands the installed package with its own library and command, and
``TESSERA_REQUIRE_TORCH=1`` turns a missing torch or shim toolchain into a failure instead of a
skip; CI sets both.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Optional

import pytest

PYTHON_DIR = Path(__file__).resolve().parents[1]
REPO = PYTHON_DIR.parent
SIM = "devices:2,capacity:1GiB,granularity:2MiB"
MiB = 1 << 20
GiB = 1 << 30

os.environ["TESSERA_DRIVER"] = "sim"
os.environ["TESSERA_SIM"] = SIM
for _name in ("TESSERA_CONF", "TESSERA_TRACE"):
    os.environ.pop(_name, None)

# An installed tessera if there is one, else the source tree's.
if importlib.util.find_spec("tessera") is None:
    sys.path.insert(0, str(PYTHON_DIR))
import tessera  # noqa: E402 - after the environment is set

#: Where the imported package lives, and whether it is an installed one (not the source tree).
PACKAGE_DIR = Path(tessera.__file__).resolve().parent
INSTALLED = PACKAGE_DIR != PYTHON_DIR / "tessera"
REQUIRE_INSTALLED = os.environ.get("TESSERA_TEST_INSTALLED") == "1"
REQUIRE_TORCH = os.environ.get("TESSERA_REQUIRE_TORCH") == "1"


def import_torch() -> ModuleType:
    """torch, or a skip of the calling module when it is not installed (a failure under
    ``TESSERA_REQUIRE_TORCH=1``)."""
    try:
        import torch
    except ImportError as error:
        if REQUIRE_TORCH:
            pytest.fail(f"TESSERA_REQUIRE_TORCH=1 but torch cannot be imported: {error}", pytrace=False)
        pytest.skip(f"torch is not installed ({error})", allow_module_level=True)
    return torch


def missing_requirement(reason: str) -> None:
    """Skips the calling test for ``reason``, or fails it under ``TESSERA_REQUIRE_TORCH=1``."""
    if REQUIRE_TORCH:
        pytest.fail(f"TESSERA_REQUIRE_TORCH=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def tessera_command() -> Path:
    """The ``tessera`` command under test: ``$TESSERA_BIN``; else, for an installed package, the
    one the wheel put in this environment's scripts folder; else the repository's
    ``target/debug`` or ``target/release`` build."""
    if os.environ.get("TESSERA_BIN"):
        return Path(os.environ["TESSERA_BIN"])
    if INSTALLED:
        # Where pip put the wheel's script (a venv's bin/, ~/.local/bin, ...), from the RECORD.
        for file in importlib.metadata.files("tessera") or []:
            if file.name == "tessera" and file.parent.name in ("bin", "Scripts"):
                return Path(str(file.locate())).resolve()
        return Path(sysconfig.get_path("scripts")) / "tessera"
    for profile in ("debug", "release"):
        path = REPO / "target" / profile / "tessera"
        if path.exists():
            return path
    pytest.fail("no tessera command: run `cargo build` (or set TESSERA_BIN)")


def run_python(code: str, env: Optional[dict[str, Optional[str]]] = None) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter that imports the same ``tessera`` as this process
    (the source tree goes on its PYTHONPATH; an installed package is found as installed) and
    inherits the environment; ``env`` entries override it (None removes a variable)."""
    child_env = dict(os.environ)
    if not INSTALLED:
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYTHON_DIR), child_env.get("PYTHONPATH")]))
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a subprocess that must have succeeded (its stderr in the failure message)."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout
