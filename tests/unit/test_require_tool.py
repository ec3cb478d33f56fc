"""require_tool: a missing outside program skips a test with what to install, and fails it under CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require_tool


def test_found_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tool = tmp_path / "sometool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert require_tool("sometool", "pkg") == str(tool)


def test_missing_tool_skips_naming_the_package_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install Debian package sip-tester"):
        require_tool("sipp", "Debian package sip-tester")


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=r"CI=true .*install Debian package nftables"):
        require_tool("nft", "Debian package nftables")


def test_a_pinned_path_is_not_replaced_by_another_copy_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = tmp_path / "cdk"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="npm install"):
        require_tool("cdk", "the CDK CLI (npm install)", path=tmp_path / "node_modules" / "cdk")
