"""`clearip-proxy settings write`: the settings file written whole from a site file and flags, judged
by the proxy's own rules, and how the running proxy takes the change (reload or restart)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from proxy_runtime.settings import RESTART_ONLY_FIELDS, SettingsError, load
from proxy_runtime.settings.file import (
    read_value,
    set_value,
    site_settings_toml,
    write_settings,
)

CONFIG = "/etc/clearip-proxy/settings.toml"
SITE = 'allow = ["203.0.113.10/32"]\nclearip = "sip:sip.clearip.com:5061;transport=tls"\ntimeout = 5.0\n'


def _site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_first_write_restarts_then_reload_then_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "root"
    host = {"advertise": "198.51.100.7", "proxy_id": "i-0abc"}
    assert write_settings(CONFIG, site=_site(tmp_path, SITE), values=host, root=root)[0] == "restart"
    assert write_settings(CONFIG, site=_site(tmp_path, SITE), root=root) == ("unchanged", [])
    apply, changed = write_settings(
        CONFIG, site=_site(tmp_path, SITE.replace("5.0", "3.0") + "ring_timeout = 90\n"), root=root
    )
    assert (apply, changed) == ("reload", ["timeout", "ring_timeout"])
    s = load(root / CONFIG.lstrip("/"), environ={})
    assert s.timeout == 3.0 and s.ring_timeout == 90.0
    assert s.advertise == "198.51.100.7" and s.proxy_id == "i-0abc"  # host fields kept
    # A restart-only field: the transport of the ClearIP URI.
    apply, changed = write_settings(CONFIG, site=_site(tmp_path, SITE), clearip_transport="tcp", root=root)
    assert apply == "restart" and "clearip" in changed and "clearip" in RESTART_ONLY_FIELDS
    assert read_value(CONFIG, "clearip", root=root) == "sip:sip.clearip.com:5060;transport=tcp"


def test_a_key_dropped_from_the_site_file_goes_back_to_its_default(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_settings(CONFIG, site=_site(tmp_path, SITE + "ring_timeout = 90\n"), root=root)
    apply, changed = write_settings(CONFIG, site=_site(tmp_path, SITE), root=root)
    assert (apply, changed) == ("reload", ["ring_timeout"])
    assert read_value(CONFIG, "ring_timeout", root=root) == 180.0


@pytest.mark.parametrize(
    ("site", "setting", "fragment"),
    [
        (SITE.replace("/32", ""), "allow", "bare address"),
        (SITE.replace("203.0.113.10/32", "0.0.0.0/0"), "allow", "whole internet"),
        (SITE + 'advertise = "192.0.2.1"\n', "advertise", "belongs to one host"),
        (SITE.replace("5.0", "61"), "timeout", "at most 60"),
        (SITE + "bogus = 1\n", "bogus", "unknown setting"),
    ],
)
def test_refused_settings_leave_the_file_alone(
    tmp_path: Path, site: str, setting: str, fragment: str
) -> None:
    root = tmp_path / "root"
    write_settings(CONFIG, site=_site(tmp_path, SITE), root=root)
    before = (root / CONFIG.lstrip("/")).read_text()
    with pytest.raises(SettingsError) as err:
        write_settings(CONFIG, site=_site(tmp_path, site), root=root)
    assert err.value.setting == setting and fragment in str(err.value)
    assert (root / CONFIG.lstrip("/")).read_text() == before


def test_site_settings_toml_is_what_settings_write_reads(tmp_path: Path) -> None:
    text = site_settings_toml({"allow": ["203.0.113.10/32"], "timeout": 4, "copy_headers": ["Identity"]})
    root = tmp_path / "root"
    write_settings(CONFIG, site=_site(tmp_path, text), root=root)
    assert read_value(CONFIG, "copy_headers", root=root) == ("Identity",)
    with pytest.raises(SettingsError, match="belongs to one host"):
        site_settings_toml({"proxy_id": "x"})


def test_the_cli_verbs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    site = _site(tmp_path, SITE)
    cli = [sys.executable, "-m", "proxy_runtime", "settings"]
    w = subprocess.run([*cli, "write", "--config", CONFIG, "--root", str(root), "--site", str(site)],
                       capture_output=True, text=True)  # fmt: skip
    assert w.returncode == 0 and w.stdout.strip() == "restart"
    g = subprocess.run(
        [*cli, "get", "allow", "--config", CONFIG, "--root", str(root)], capture_output=True, text=True
    )
    assert g.stdout.splitlines() == ["203.0.113.10/32"]
    bad = subprocess.run([*cli, "write", "--config", CONFIG, "--root", str(root), "--allow", "10.0.0.1"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "'allow': '10.0.0.1' is a bare address" in bad.stderr


def _owner_for_test() -> tuple[int, int]:
    """An owner the replaced file must keep: as root another user's (so the writer has to chown, as
    the Session Manager documents run as root over a root:clearip-proxy file), else our own."""
    return (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())


@pytest.mark.parametrize("writer", ["set", "settings write"])
def test_replacing_the_file_keeps_its_mode_owner_and_group(tmp_path: Path, writer: str) -> None:
    """`clearip-proxy set` (SetTimeout, SetClearIpTransport) and `settings write` rename a temporary
    file (0600, owned by the writer) over settings.toml: the result must stay readable by the proxy's
    user, i.e. keep the mode and owner/group install.sh gave it (0640 root:clearip-proxy)."""
    cfg = tmp_path / "settings.toml"
    cfg.write_text(SITE)
    uid, gid = _owner_for_test()
    os.chown(cfg, uid, gid)
    os.chmod(cfg, 0o640)
    if writer == "set":
        args = ["set", "timeout", "3", "--config", str(cfg)]
    else:
        args = ["settings", "write", "--config", str(cfg), "--set", "timeout=3"]
    run = subprocess.run([sys.executable, "-m", "proxy_runtime", *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert load(cfg, environ={}).timeout == 3.0
    st = cfg.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, uid, gid)


def test_a_new_file_is_0640(tmp_path: Path) -> None:
    cfg = tmp_path / "settings.toml"
    set_value(cfg, "timeout", "3")
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o640


def test_an_unreadable_settings_file_is_a_clear_error(tmp_path: Path) -> None:
    """The proxy refuses to start with a message naming the file, not a traceback (systemd would
    restart it forever). A directory stands in for an unreadable file (root reads any file)."""
    unreadable = tmp_path / "settings.toml"
    unreadable.mkdir()
    with pytest.raises(SettingsError) as err:
        load(unreadable, environ={})
    assert err.value.setting == "config" and f"cannot read {unreadable}" in str(err.value)
    run = subprocess.run(
        [sys.executable, "-m", "proxy_runtime", "run", "--config", str(unreadable)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"cannot read {unreadable}" in run.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_a_file_the_proxy_may_not_read_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "settings.toml"
    cfg.write_text(SITE)
    cfg.chmod(0)
    with pytest.raises(SettingsError, match=r"cannot read .*Permission denied"):
        load(cfg, environ={})
