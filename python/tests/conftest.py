"""pytest fixtures; the environment (simulated driver) is set by ``support`` on import."""

from __future__ import annotations

import pytest
import support  # noqa: F401 - sets TESSERA_DRIVER/TESSERA_SIM before the library is loaded

import tessera


@pytest.fixture(scope="session")
def lib() -> tessera.Library:
    """The library every in-process test shares (2 simulated devices of 1 GiB)."""
    return tessera.load()
