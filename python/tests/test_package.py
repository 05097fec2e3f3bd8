"""The package as a user gets it: one version everywhere, the library and the command inside the
wheel, ``import tessera`` without torch, and clear errors for a missing, foreign or mismatched
library. The wheel's own checks run when the installed package is under test (CI's case)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    INSTALLED,
    PACKAGE_DIR,
    REPO,
    REQUIRE_INSTALLED,
    check,
    missing_requirement,
    run_python,
    tessera_command,
)

import tessera

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - CI runs 3.11
    tomllib = None

installed_only = pytest.mark.skipif(
    not INSTALLED and not REQUIRE_INSTALLED, reason="the source tree is under test, not an installed wheel"
)


def cargo_version() -> str:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]


def fake_library(tmp_path: Path, body: str) -> Path:
    """A shared library built from C ``body`` (the stand-in for a library of another version)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        missing_requirement("no C compiler (cc) to build a stand-in library")
    source = tmp_path / "fake.c"
    source.write_text(body)
    library = tmp_path / "libfake.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


# One version ---------------------------------------------------------------------------------


def test_package_and_library_report_cargo_tomls_version(lib):
    assert tessera.__version__ == cargo_version()
    assert lib.version() == tessera.__version__


@installed_only
def test_wheel_metadata_and_command_report_the_same_version():
    assert importlib.metadata.version("tessera") == tessera.__version__
    out = subprocess.run([tessera_command(), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"tessera {tessera.__version__}"


@installed_only
def test_wheel_holds_the_library_inside_the_package_and_is_tagged_for_any_python3():
    assert tessera.find_library() == PACKAGE_DIR / "libtessera.so"
    wheel = importlib.metadata.distribution("tessera").read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    assert tags and all(tag.startswith("py3-none-") and "x86_64" in tag for tag in tags), wheel
    assert "Root-Is-Purelib: false" in wheel
    files = {str(f) for f in importlib.metadata.files("tessera") or []}
    assert "tessera/libtessera.so" in files and "tessera/_build_version.py" in files
    assert not any("libcuda" in f for f in files)  # the driver is loaded at run time, never bundled


@installed_only
def test_installed_command_replays_a_bundled_trace():
    trace = REPO / "traces" / "transformer-varlen.csv.gz"
    out = subprocess.run(
        [tessera_command(), "replay", str(trace), "--policy", "tessera", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert '"policy":"tessera"' in out.stdout.replace(" ", "")


def test_import_tessera_does_not_need_torch():
    out = check(
        run_python(
            """
            import sys
            sys.modules["torch"] = None  # any `import torch` now raises ImportError
            import tessera
            lib = tessera.load()
            print(lib.version(), "torch" in sys.modules and sys.modules["torch"] is not None)
            """
        )
    )
    assert out.split() == [tessera.__version__, "False"]


def test_tessera_torch_without_torch_names_the_extra():
    out = check(
        run_python(
            """
            import sys
            sys.modules["torch"] = None
            try:
                import tessera.torch
            except ImportError as e:
                print(type(e).__name__, e.name, "|", e)
            """
        )
    )
    assert out.startswith("ModuleNotFoundError torch |") and "pip install 'tessera[torch]'" in out


# Bad libraries -------------------------------------------------------------------------------


def test_a_library_of_another_version_names_both(tmp_path, monkeypatch):
    other = fake_library(tmp_path, 'const char *tessera_version(void) { return "0.0.1-other"; }\n')
    with pytest.raises(tessera.LibraryVersionError) as error:
        tessera.load(other)
    message = str(error.value)
    assert "0.0.1-other" in message and tessera.__version__ in message and str(other) in message
    assert (error.value.library_version, error.value.package_version) == ("0.0.1-other", tessera.__version__)
    monkeypatch.setenv("TESSERA_LIBRARY", str(other))
    with pytest.raises(tessera.LibraryVersionError):
        tessera.load()


def test_a_file_that_is_not_a_tessera_library_says_so(tmp_path, monkeypatch):
    text = tmp_path / "libtessera.so"
    text.write_text("not a shared library\n")
    foreign = fake_library(tmp_path, "int some_other_function(void) { return 1; }\n")
    for path, why in [(text, "cannot be loaded as a tessera library"), (foreign, "is not a tessera library: it has no tessera_version")]:
        monkeypatch.setenv("TESSERA_LIBRARY", str(path))
        with pytest.raises(tessera.InvalidLibraryError, match=f"{path} {why}"):
            tessera.load()


def test_a_library_of_the_right_version_lacking_functions_is_refused(tmp_path):
    partial = fake_library(tmp_path, f'const char *tessera_version(void) {{ return "{tessera.__version__}"; }}\n')
    with pytest.raises(tessera.InvalidLibraryError, match="is not a tessera library .*: it lacks .*tessera_malloc"):
        tessera.load(partial)
