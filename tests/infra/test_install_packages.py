"""deploy/install.sh's OS package step on an apt-get host (Debian 12, by hand): the package lists
are refreshed once before the first install, a failed refresh is a warning, and nothing is fetched
when nothing is missing.

install.sh runs without ``--root`` here (the package step runs only on a live system), with every
program the step calls replaced by a stub on PATH that records its arguments: ``apt-get``,
``python3.11`` (no C headers, so the optional compiler packages are wanted), ``gcc``, ``tcpdump``,
``openssl`` and ``id`` (so the run needs no root). ``--settings`` names a missing file, so the
script stops right after the package step with that message and touches nothing else.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import require_tool

from .conftest import REPO

INSTALL = REPO / "deploy" / "install.sh"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def run_package_step(tmp_path: Path, *args: str, update_fails: bool = False) -> tuple[str, list[str]]:
    require_tool("bash", "bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    no_headers = tmp_path / "include"  # a Python include directory without Python.h
    no_headers.mkdir()
    update_status = 100 if update_fails else 0
    _stub(
        bin_dir,
        "apt-get",
        f'echo "apt-get $*" >> {calls}\n[ "$1" = update ] && exit {update_status}\nexit 0\n',
    )
    _stub(
        bin_dir,
        "python3.11",
        f'case "$*" in *sysconfig*) echo {no_headers} ;; esac\nexit 0\n',
    )
    for name in ("gcc", "tcpdump", "openssl"):
        _stub(bin_dir, name, "exit 0\n")
    _stub(bin_dir, "id", "echo 0\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    missing = tmp_path / "no-such-settings.toml"
    proc = subprocess.run(
        ["bash", str(INSTALL), "--settings", str(missing), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    out = proc.stdout + proc.stderr
    # Stopped right after the package step, as arranged: nothing past it ran.
    assert proc.returncode != 0 and f"--settings {missing}: no such file" in out, out
    return out, calls.read_text().splitlines() if calls.exists() else []


def test_the_package_lists_are_refreshed_before_the_first_install(tmp_path: Path) -> None:
    out, calls = run_package_step(tmp_path)
    assert calls == ["apt-get update -q", "apt-get install -y -q python3.11-dev"], out
    assert "installing python3.11-dev (optional: to compile the proxy's core)" in out


def test_a_failed_refresh_is_a_warning_and_the_install_still_runs(tmp_path: Path) -> None:
    out, calls = run_package_step(tmp_path, update_fails=True)
    assert calls == ["apt-get update -q", "apt-get install -y -q python3.11-dev"], out
    assert "warning: apt-get update failed" in out


def test_nothing_is_fetched_when_nothing_is_missing(tmp_path: Path) -> None:
    out, calls = run_package_step(tmp_path, "--core", "pure")  # pure: the compiler is not wanted
    assert calls == [], out
