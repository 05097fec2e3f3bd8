"""pytest fixtures; the environment (simulated driver) is set by ``support`` on import."""

from __future__ import annotations

import os

import pytest
import support  # sets TESSERA_DRIVER/TESSERA_SIM before the library is loaded

import tessera


def pytest_report_header(config: pytest.Config) -> list[str]:
    where = "installed" if support.INSTALLED else "source tree"
    return [f"tessera {tessera.__version__} ({where}): {support.PACKAGE_DIR}"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under ``TESSERA_TEST_INSTALLED=1``: the package, its library and its command must be the
    installed wheel's, not the source tree's or a TESSERA_LIBRARY override."""
    if not support.REQUIRE_INSTALLED:
        return
    problems = []
    if not support.INSTALLED:
        problems.append(f"tessera is imported from the source tree ({support.PACKAGE_DIR})")
    if os.environ.get("TESSERA_LIBRARY"):
        problems.append("TESSERA_LIBRARY is set")
    try:
        found = tessera.find_library()
        if found != support.PACKAGE_DIR / tessera._lib.LIBRARY_NAME:
            problems.append(f"the library found is {found}, not the package's own")
    except tessera.LibraryNotFoundError as error:
        problems.append(str(error))
    if not support.tessera_command().is_file():
        problems.append(f"no tessera command at {support.tessera_command()}")
    if problems:
        pytest.exit("TESSERA_TEST_INSTALLED=1, but " + "; ".join(problems), returncode=3)


@pytest.fixture(scope="session")
def lib() -> tessera.Library:
    """The library every in-process test shares (2 simulated devices of 1 GiB)."""
    return tessera.load()
