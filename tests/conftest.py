"""Session-wide test settings, and :func:`require_tool` for tests that run an outside program."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# `make test-compiled`: CLEARIP_COMPILED_DIR names the compiled build's install (`make compiled`),
# which goes first on sys.path, before any test imports proxy_runtime; proxies the tests start get it
# through tests/integration/harness.py. The run stops at once if the core is not the compiled one.
COMPILED_BUILD = os.environ.get("CLEARIP_COMPILED_DIR", "")
if COMPILED_BUILD:
    _built = Path(COMPILED_BUILD) / ".built"  # the Makefile's stamp of a finished build
    _sources = Path(__file__).resolve().parents[1] / "proxy_runtime"
    _newer = [
        p for p in _sources.rglob("*.py") if not _built.exists() or p.stat().st_mtime > _built.stat().st_mtime
    ]
    if _newer:
        raise pytest.UsageError(
            f"CLEARIP_COMPILED_DIR={COMPILED_BUILD} is older than {_newer[0]} (or unfinished): "
            "run `make compiled` (or `make test-compiled`, which does)"
        )
    sys.path.insert(0, str(Path(COMPILED_BUILD).resolve()))
    from proxy_runtime.core import build_kind

    if build_kind() != "compiled":
        raise pytest.UsageError(
            f"CLEARIP_COMPILED_DIR={COMPILED_BUILD}: the core imported is {build_kind()}, not "
            "compiled (run `make compiled`)"
        )

# Proxies started by tests run without the default control socket (/run or /tmp), so a doctor or
# trace test can never reach a proxy some other test (or a benchmark) started. Tests that need a
# control socket pass an explicit --control-socket PATH.
os.environ.setdefault("CLEARIP_CONTROL_SOCKET", "off")
# Never let botocore probe the EC2 instance metadata address from a test.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def in_ci() -> bool:
    """True when the run is a CI run (``CI=true``, as GitHub Actions, GitLab CI and others set)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


def require_tool(name: str, package: str, *, path: Path | None = None) -> str:
    """The path of an outside program a test needs: ``path`` when given (a pinned copy, e.g. the
    CDK CLI in node_modules, never another version found on PATH), else ``name`` on PATH.

    When it is missing, the test is skipped with a reason naming what to install, except under
    ``CI=true``, where a missing tool fails the test: CI must run every test, never report a
    green run that silently skipped SIPp or shellcheck. ``make setup`` installs every one.
    """
    found = (str(path) if path.exists() else None) if path is not None else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: install {package} (`make setup` does)"
    if in_ci():
        pytest.fail(f"CI=true and a tool this test needs is missing: {message}", pytrace=False)
    pytest.skip(message)
