"""Build of clearip-proxy: pure Python, or with the sans-I/O core compiled to C by mypyc.

The project's metadata is in pyproject.toml; this file only decides whether the wheel carries
compiled modules, by ``CLEARIP_COMPILE``:

- unset or ``0``: pure Python, the default (``pip install .`` works anywhere Python 3.11 does);
- ``1``: compile ``proxy_runtime/sip``, ``proxy_runtime/core`` and the per-call metrics modules
  (``COMPILED_METRICS``) with mypyc, and fail when mypyc
  (the ``mypy`` package, which must then be importable: ``--no-build-isolation``) or a C compiler
  with the Python headers is missing;
- ``auto``: compile when both are there, else build pure Python and say why.

A compiled wheel still carries every ``.py`` file: Python imports the compiled module when one is
there and its source otherwise, and ``clearip-proxy --version`` says which build runs. The
transport, operations, settings and the metrics publisher stay Python (asyncio protocols and
start-up code gain little from compiling). mypyc is the compiler made for this code: it is
already strict-mypy clean and mypyc compiles it unchanged (Cython would need a second, annotated
copy of the core).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
COMPILED_PACKAGES = ("proxy_runtime/sip", "proxy_runtime/core")
# The metrics modules every finished call runs through (its counters, STIR/SHAKEN reading and JSON
# line: about a tenth of a call's CPU when interpreted). The publisher and sinks (aiobotocore,
# start-up) stay Python.
COMPILED_METRICS = ("names", "privacy", "records", "stir", "recorder")
MODE = os.environ.get("CLEARIP_COMPILE", "0").strip().lower()


def compiled_sources() -> list[str]:
    """The modules mypyc compiles (package __init__ files stay Python: they hold no code)."""
    return sorted(
        [
            str(p.relative_to(ROOT))
            for pkg in COMPILED_PACKAGES
            for p in (ROOT / pkg).glob("*.py")
            if p.name != "__init__.py"
        ]
        + [f"proxy_runtime/metrics/{name}.py" for name in COMPILED_METRICS]
    )


def _fallback(why: str) -> list[Any]:
    if MODE == "1":
        sys.exit(f"CLEARIP_COMPILE=1: cannot compile the core: {why}")
    print(f"clearip-proxy: building pure Python (CLEARIP_COMPILE={MODE}): {why}", file=sys.stderr)
    return []


def ext_modules() -> list[Any]:
    if MODE in ("", "0"):
        return []
    if MODE not in ("1", "auto"):
        sys.exit(f"CLEARIP_COMPILE must be 0, 1 or auto, not {MODE!r}")
    try:
        from mypyc.build import mypycify
    except ImportError as exc:  # not installed, or its compiled modules cannot load (a noexec /tmp)
        return _fallback(f"mypyc cannot be imported ({exc}; pip install mypy, then --no-build-isolation)")
    cwd = os.getcwd()
    os.chdir(ROOT)  # mypycify reads the sources and writes its C under build/ relative to here
    try:
        return list(mypycify(compiled_sources(), opt_level="3"))
    except (SystemExit, Exception) as exc:  # mypyc reports type errors by exiting
        return _fallback(f"mypyc failed: {exc}")
    finally:
        os.chdir(cwd)


class OptionalBuildExt(build_ext):
    """With ``auto``, a C compile that fails (no compiler, no Python headers) leaves the pure
    Python modules in the wheel instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            if MODE != "auto":
                raise
            # A compile that failed part-way leaves what it built (mypyc's shared library, some
            # modules' shims) in build_lib, and the wheel would carry a mixed core that raises
            # TypeError where compiled and pure classes meet: drop every compiled module.
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            self.extensions: list[Any] = []
            print(f"clearip-proxy: building pure Python: the C compile failed: {exc}", file=sys.stderr)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
