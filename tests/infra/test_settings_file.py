"""`clearip-proxy settings write`: the settings file written whole from a site file and flags, judged
by the proxy's own rules, and how the running proxy takes the change (reload or restart)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy_runtime.settings import RESTART_ONLY_FIELDS, SettingsError, load
from proxy_runtime.settings.file import read_value, site_settings_toml, write_settings

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
