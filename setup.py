"""The three things of the wheel that pyproject.toml cannot say (see docs/packaging.md).

- The version is Cargo.toml's ``[workspace.package] version``: the one number that the crates,
  ``tessera --version`` and the library's ``tessera_version()`` report; it is also written into
  the package as ``tessera/_build_version.py``.
- libtessera.so keeps its name: setuptools names extension modules ``NAME.cpython-3XX-....so``,
  but it is a plain shared library (its SONAME is libtessera.so), loaded by path.
- The tag is ``py3-none-PLATFORM``: nothing in the wheel uses Python's C API, so one wheel serves
  every Python 3 on the platform it was built for.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent
VERSION: str = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
# pyproject.toml puts setuptools' scratch space (build/, egg-info) here; egg_info wants it to exist.
(ROOT / "target" / "python-build").mkdir(parents=True, exist_ok=True)
LIBRARY_MODULE = "libtessera"  # pyproject.toml's ext-module tessera.libtessera


class BuildExt(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # Called with the dotted name, or with its last part alone (get_ext_fullpath).
        *package, name = fullname.split(".")
        if name == LIBRARY_MODULE:
            return str(Path(*package, "libtessera.so"))
        return super().get_ext_filename(fullname)


class BuildPy(build_py):
    def run(self) -> None:
        # setuptools never empties its build folder: a module removed from python/tessera would
        # still ship. The package is small; copy it afresh every time.
        shutil.rmtree(Path(self.build_lib) / "tessera", ignore_errors=True)
        super().run()
        generated = Path(self.build_lib) / "tessera" / "_build_version.py"
        generated.write_text(f'"""Written by setup.py from Cargo.toml."""\n\nVERSION = "{VERSION}"\n')


class BdistWheel(bdist_wheel):
    def get_tag(self) -> tuple[str, str, str]:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(version=VERSION, cmdclass={"build_ext": BuildExt, "build_py": BuildPy, "bdist_wheel": BdistWheel})
