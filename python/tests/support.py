"""Shared test setup: every test runs on tessera's simulated driver (no GPU needed).

The process-wide allocator reads its environment once, at first use, so the variables are set
here, before anything loads the library; tests that need a fresh allocator (configuration, other
simulated machines, enabling too late) run Python in a subprocess through ``run_python``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

PYTHON_DIR = Path(__file__).resolve().parents[1]
SIM = "devices:2,capacity:1GiB,granularity:2MiB"
MiB = 1 << 20
GiB = 1 << 30

os.environ["TESSERA_DRIVER"] = "sim"
os.environ["TESSERA_SIM"] = SIM
for _name in ("TESSERA_CONF", "TESSERA_TRACE"):
    os.environ.pop(_name, None)

import tessera  # noqa: E402 - after the environment is set


def run_python(code: str, env: Optional[dict[str, Optional[str]]] = None) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter with the package importable and the library found
    by this process; ``env`` entries override the environment (None removes a variable)."""
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYTHON_DIR), child_env.get("PYTHONPATH")]))
    child_env["TESSERA_LIBRARY"] = str(tessera.find_library())
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
