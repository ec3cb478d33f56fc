"""The instance software path: the rendered user data, deploy/install.sh, the release association's
on-instance step and the systemd unit.

install.sh runs for real into a scratch root (``--root``): no users or firewall changes, and
systemctl, ss, aws and cfn-signal are stubs that record how they were called.
"""

from __future__ import annotations

import base64
import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Template

from infra import wheels
from infra.fleet import USER_DATA_TEMPLATE, render_user_data
from proxy_runtime.settings import MAX_DRAIN_TIMEOUT, STOP_MARGIN, UNIT_TIMEOUT_STOP_SEC, Settings, load
from tests.conftest import in_ci, require_tool

from .conftest import REPO, flatten, resources

INSTALL = REPO / "deploy" / "install.sh"
UNIT = REPO / "deploy" / "clearip-proxy.service"
ARGS = [
    "--allow", "203.0.113.10/32,198.51.100.0/28",
    "--allow", "2001:db8::/48",
    "--advertise", "198.51.100.7",
    "--timeout", "3",
    "--clearip-transport", "tcp",
    "--proxy-id", "i-0123456789abcdef0",
    "--metrics", "cloudwatch",
    "--aws-region", "us-east-1",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the runtime, as the asset ships it: the work tree may change while tests run."""
    global RELEASE
    RELEASE = tmp_path_factory.mktemp("release")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("proxy_runtime", "deploy"):
        shutil.copytree(REPO / name, RELEASE / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "requirements-runtime.txt", "requirements-runtime.lock",
                 "requirements-build.lock"):  # fmt: skip
        shutil.copy2(REPO / name, RELEASE / name)
    return RELEASE


RELEASE = REPO


def run_install(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(RELEASE / "deploy/install.sh"), "--root", str(root), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def rendered_user_data(template: Template) -> list[str]:
    refs = {"AWS::StackName": "ClearIpProxy", "AWS::Region": "us-east-1", "AWS::AccountId": "123456789012"}
    tpl = template.to_json()
    out = []
    for inst in resources(tpl, "AWS::EC2::Instance").values():
        parts = inst["Properties"]["UserData"]["Fn::Base64"]["Fn::Join"][1]
        eip = next(p["Ref"] for p in parts if isinstance(p, dict) and "Ref" in p and "ElasticIp" in p["Ref"])
        out.append(flatten(inst["Properties"]["UserData"], {**refs, eip: "198.51.100.7"}))
    return out


# ---- the user data ---------------------------------------------------------------------------
def test_rendered_user_data_is_valid_bash(template: Template, tmp_path: Path) -> None:
    for i, text in enumerate(rendered_user_data(template)):
        assert "@@" not in text and "REF-" not in text and "ATT-" not in text
        script = tmp_path / f"user-data-{i}.sh"
        script.write_text(text)
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert "ELASTIC_IP='198.51.100.7'" in text
        assert "RELEASE_PARAMETER='/ClearIpProxy/clearip-proxy/release'" in text


def test_shellcheck_clean(template: Template, tmp_path: Path) -> None:
    shellcheck = require_tool("shellcheck", "Debian package shellcheck")
    script = tmp_path / "user-data.sh"
    script.write_text(rendered_user_data(template)[0])
    proc = subprocess.run(
        [shellcheck, "--shell=bash", str(INSTALL), str(USER_DATA_TEMPLATE), str(script)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout


def test_render_refuses_quotes_and_missing_values() -> None:
    with pytest.raises(ValueError, match="single quote"):
        render_user_data({"STACK": "a'b"})
    with pytest.raises(ValueError, match="unfilled"):
        render_user_data({"STACK": "x"})


def make_stubs(tmp_path: Path, calls: Path, extra: dict[str, str] | None = None) -> Path:
    """systemctl, ss, journalctl, sleep (and ``extra``) that record their arguments in ``calls``."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    stub = {
        "systemctl": f'echo "systemctl $*" >> {calls}',
        "ss": "echo 'UNCONN 0 0 0.0.0.0:5060 0.0.0.0:*'",
        "journalctl": "exit 0",
        "sleep": "exit 0",
        **(extra or {}),
    }
    for name, body in stub.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    return stubs


def test_user_data_flow_with_stubbed_commands(template: Template, tmp_path: Path) -> None:
    """Run the user data with dnf, curl, aws, systemctl, ss and cfn-signal stubbed: it must read the
    release and settings from the parameters, run that release's install.sh with them and the host's
    own values, signal success, and restart the proxy once the Elastic IP has arrived."""
    text = rendered_user_data(template)[0]
    calls = tmp_path / "calls.log"
    # A release zip with an install.sh that records its arguments and the settings it was given.
    src = tmp_path / "release"
    (src / "deploy").mkdir(parents=True)
    (src / "deploy" / "install.sh").write_text(
        f'#!/bin/bash\necho "install.sh $*" >> {calls}\n'
        "while [ $# -gt 0 ]; do\n"
        f'  [ "$1" = --settings ] && cp "$2" {tmp_path / "site-given.toml"}; shift\ndone\n'
    )
    shutil.make_archive(str(tmp_path / "proxy"), "zip", root_dir=src)
    site = 'allow = ["203.0.113.10/32"]\ntimeout = 5.0\n'
    (tmp_path / "site.toml").write_text(site)
    stubs = make_stubs(
        tmp_path,
        calls,
        {
            "dnf": f'echo "dnf $*" >> {calls}',
            "curl": 'case "$*" in *api/token*) echo token;; *public-ipv4*) echo 198.51.100.7;; '
            "*instance-id*) echo i-0abc;; esac",
            "aws": f'echo "aws $*" >> {calls}\n'
            'case "$*" in *"ssm get-parameter"*/release*) echo "s3://assets/abc.zip 0123abcd";;\n'
            f'  *"ssm get-parameter"*/settings*) cat {tmp_path / "site.toml"};;\n'
            f'  *"s3 cp"*) cp {tmp_path / "proxy.zip"} "${{@: -1}}";; esac',
            "cfn-signal": f'echo "cfn-signal $*" >> {calls}',
        },
    )
    script = tmp_path / "ud.sh"
    script.write_text(
        text.replace("/var/log/clearip-proxy-bootstrap.log", str(tmp_path / "boot.log")).replace(
            "/opt/aws/bin/cfn-signal", str(stubs / "cfn-signal")
        )
    )
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    log = calls.read_text()
    assert proc.returncode == 0, (tmp_path / "boot.log").read_text() + log
    assert "dnf install -y -q python3.11 tcpdump" in log
    assert "aws ssm get-parameter --region us-east-1 --name /ClearIpProxy/clearip-proxy/release" in log
    assert "aws s3 cp --only-show-errors --region us-east-1 s3://assets/abc.zip" in log
    install_line = next(line for line in log.splitlines() if line.startswith("install.sh "))
    for expected in (
        "--settings ",
        "--release-id 0123abcd",
        "--offline",
        "--advertise 198.51.100.7",
        "--proxy-id i-0abc",
        "--aws-region us-east-1",
        "--wait 120",
    ):
        assert expected in install_line
    assert (tmp_path / "site-given.toml").read_text() == site  # the settings parameter, as it is
    lines = log.splitlines()
    signal = next(i for i, line in enumerate(lines) if line.startswith("cfn-signal"))
    assert "--exit-code 0" in lines[signal] and "--stack ClearIpProxy" in lines[signal]
    assert "--resource FleetProxy1" in lines[signal]
    # After the signal, the Elastic IP arrives: the proxy reconnects to ClearIP from it.
    assert "systemctl restart clearip-proxy" in lines[signal + 1 :]


# ---- install.sh in a scratch root ----------------------------------------------------------
@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("root")
    first = run_install(root, "--skip-venv", *ARGS)
    second = run_install(root, "--skip-venv", *ARGS)
    return {"root": root, "first": first, "second": second}


def test_settings_file_is_accepted_by_the_proxy(installed: dict[str, Any]) -> None:
    root: Path = installed["root"]
    cfg = root / "etc/clearip-proxy/settings.toml"
    # The file names the live paths; point the TLS files into the scratch root to load it.
    s = load(
        cfg,
        environ={},
        overrides={
            "tls_cert": str(root / "etc/clearip-proxy/tls/cert.pem"),
            "tls_key": str(root / "etc/clearip-proxy/tls/key.pem"),
        },
    )
    assert s.allow == ("203.0.113.10/32", "198.51.100.0/28", "2001:db8::/48")
    assert s.advertise == "198.51.100.7"
    assert s.clearip == "sip:sip.clearip.com:5060;transport=tcp"
    assert s.timeout == 3.0
    assert s.proxy_id == "i-0123456789abcdef0"
    assert s.metrics == "cloudwatch"
    text = cfg.read_text()
    assert 'tls_cert = "/etc/clearip-proxy/tls/cert.pem"' in text
    assert 'tls_key = "/etc/clearip-proxy/tls/key.pem"' in text
    assert [h.port for h in s.tls] == [5061]  # the self-signed certificate enables the TLS listener
    assert (
        root / "etc/clearip-proxy/environment"
    ).read_text() == "AWS_REGION=us-east-1\nAWS_DEFAULT_REGION=us-east-1\n"


def test_self_signed_certificate(installed: dict[str, Any]) -> None:
    cert = installed["root"] / "etc/clearip-proxy/tls/cert.pem"
    openssl = require_tool("openssl", "Debian package openssl")
    out = subprocess.run(
        [openssl, "x509", "-in", str(cert), "-noout", "-subject", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "198.51.100.7" in out.stdout
    assert oct((installed["root"] / "etc/clearip-proxy/tls/key.pem").stat().st_mode & 0o777) == "0o640"


def test_runtime_and_unit_installed(installed: dict[str, Any]) -> None:
    root: Path = installed["root"]
    src = root / "opt/clearip-proxy/src"
    assert (src / "proxy_runtime/metrics/names.py").is_file()
    assert (src / "requirements-runtime.txt").is_file() and (src / "pyproject.toml").is_file()
    assert not (src / "tests").exists() and not (src / "infra").exists()
    assert (root / "etc/systemd/system/clearip-proxy.service").read_text() == UNIT.read_text()
    assert not (root / "opt/clearip-proxy/venv").exists()  # --skip-venv


def test_nftables_allow_list(installed: dict[str, Any]) -> None:
    root: Path = installed["root"]
    rules = (root / "etc/clearip-proxy/firewall.nft").read_text()
    assert "elements = { 203.0.113.10/32, 198.51.100.0/28 }" in rules
    assert "elements = { 2001:db8::/48 }" in rules
    assert "ip saddr @trusted4 udp dport 5060 accept" in rules
    assert "ip saddr @trusted4 tcp dport { 5060, 5061 } accept" in rules
    assert rules.rstrip().endswith("}") and "udp dport 5060 drop" in rules
    dropin = (root / "etc/systemd/system/clearip-proxy.service.d/firewall.conf").read_text()
    assert "ExecStartPre=+" in dropin and "/etc/clearip-proxy/firewall.nft" in dropin


def test_nftables_rules_pass_nft_check(installed: dict[str, Any]) -> None:
    """`nft -c` parses and checks the ruleset without applying it. It needs CAP_NET_ADMIN to open a
    netlink socket; without it (an unprivileged run) the check cannot run and the test says so."""
    nft = require_tool("nft", "Debian package nftables")
    rules = installed["root"] / "etc/clearip-proxy/firewall.nft"
    cmd = [nft, "-c", "-f", str(rules)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    unshare = shutil.which("unshare")
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr and unshare:
        # Not root: a user and network namespace of our own grants CAP_NET_ADMIN for the check.
        cmd = [unshare, "--user", "--map-root-user", "--net", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        message = f"nft -c needs CAP_NET_ADMIN (root or user namespaces): {proc.stderr.strip()}"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    assert proc.returncode == 0, proc.stderr


def test_second_run_changes_nothing(installed: dict[str, Any]) -> None:
    assert "changed:" in installed["first"].stdout
    assert installed["second"].stdout.strip().splitlines() == ["install.sh: unchanged"]


def test_changed_argument_rewrites_settings_only(tmp_path: Path) -> None:
    run_install(tmp_path, "--skip-venv", *ARGS)
    cert = (tmp_path / "etc/clearip-proxy/tls/cert.pem").read_bytes()
    args = list(ARGS)
    args[args.index("--timeout") + 1] = "2.5"
    out = run_install(tmp_path, "--skip-venv", *args).stdout
    assert out.count("changed:") == 1 and "settings.toml" in out
    assert "timeout = 2.5" in (tmp_path / "etc/clearip-proxy/settings.toml").read_text()
    assert (tmp_path / "etc/clearip-proxy/tls/cert.pem").read_bytes() == cert  # operator certs are kept


def test_uninstall(tmp_path: Path) -> None:
    run_install(tmp_path, "--skip-venv", *ARGS)
    out = run_install(tmp_path, "--uninstall").stdout
    assert "removed" in out
    for path in ("opt/clearip-proxy", "etc/clearip-proxy", "etc/systemd/system/clearip-proxy.service",
                 "etc/systemd/system/clearip-proxy.service.d"):  # fmt: skip
        assert not (tmp_path / path).exists(), path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--allow", "203.0.113.10"], "bare address"),
        (["--allow", "0.0.0.0/0"], "whole internet"),
        (["--allow", "::/0"], "whole internet"),
        ([], "--allow CIDR is required"),
        (["--allow", "203.0.113.10/24"], "did you mean 203.0.113.0/24"),
        (["--allow", "10.0.0.0/8", "--timeout", "0"], "'timeout': must be greater than 0"),
        (["--allow", "10.0.0.0/8", "--timeout", "90"], "'timeout': must be at most 60"),
        (["--allow", "10.0.0.0/8", "--timeout", "soon"], "'timeout': expected a number"),
        (["--allow", "10.0.0.0/8", "--clearip-transport", "udp"], "must be tls or tcp"),
        (["--allow", "10.0.0.0/8", "--metrics", "graphite"], "'metrics': must be one of"),
        (["--allow", "10.0.0.0/8", "--bogus"], "unknown argument"),
        (["--allow", "10.0.0.0/8", "--core", "fast"], "--core fast: expected auto, compiled or pure"),
    ],
)
def test_install_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_install(tmp_path, "--skip-venv", *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "etc/clearip-proxy/settings.toml").exists()


def test_help() -> None:
    proc = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, check=True)
    assert "--skip-venv" in proc.stdout and "--uninstall" in proc.stdout


# ---- the release association's on-instance step -----------------------------------------------
SITE_1 = 'allow = ["203.0.113.10/32"]\nclearip = "sip:sip.clearip.com:5061;transport=tls"\ntimeout = 5.0\n'
SITE_2 = SITE_1.replace('["203.0.113.10/32"]', '["203.0.113.10/32", "192.0.2.0/24"]').replace("5.0", "3.0")


def apply_release_script(template: Template, root: Path, zip_path: Path, release_id: str, site: str) -> str:
    """The ApplyRelease document's commands as Run Command would run them, into a scratch root."""
    (doc,) = [
        d["Properties"]
        for d in resources(template.to_json(), "AWS::SSM::Document").values()
        if d["Properties"]["Name"] == "ClearIpProxy-ApplyRelease"
    ]
    script = "\n".join(doc["Content"]["mainSteps"][0]["inputs"]["runCommand"])
    for key, value in {
        "AssetUrl": f"s3://assets/{zip_path.name}",
        "ReleaseId": release_id,
        "Settings": base64.b64encode(site.encode()).decode(),
        "Region": "us-east-1",
    }.items():
        script = script.replace("{{ " + key + " }}", value)
    # OS packages allowed: a proxy that booted before the compiled core gets gcc there (optional).
    assert "--no-packages" not in script
    # The only change: a scratch root (no venv, packages or firewall), systemctl as a stub.
    return script.replace("--offline", f"--offline --root {root} --service systemctl --skip-venv")


def run_apply(template: Template, tmp_path: Path, root: Path, release: Path, release_id: str, site: str,
              listening: bool = True) -> tuple[subprocess.CompletedProcess[str], list[str]]:  # fmt: skip
    calls = tmp_path / "calls.log"
    calls.write_text("")
    zip_path = Path(shutil.make_archive(str(tmp_path / f"release-{release_id}"), "zip", root_dir=release))
    stubs = make_stubs(
        tmp_path,
        calls,
        {
            "aws": f'case "$*" in *"s3 cp"*) cp {zip_path} "${{@: -1}}";; *) exit 1;; esac',
            "ss": "echo 'UNCONN 0 0 0.0.0.0:5060 0.0.0.0:*'" if listening else "exit 0",
        },
    )
    script = apply_release_script(template, root, zip_path, release_id, site)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    return proc, calls.read_text().splitlines()


@pytest.fixture
def first_boot(tmp_path: Path) -> Path:
    """A proxy as the user data leaves it: release 1, the site settings and its host values."""
    root = tmp_path / "root"
    site = tmp_path / "site.toml"
    site.write_text(SITE_1)
    calls = tmp_path / "calls.log"
    stubs = make_stubs(tmp_path, calls)
    proc = subprocess.run(
        ["bash", str(RELEASE / "deploy/install.sh"), "--root", str(root), "--service", "systemctl",
         "--skip-venv", "--settings", str(site), "--release-id", "r1", "--advertise", "198.51.100.7",
         "--proxy-id", "i-0abc"],
        env={"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path)}, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def test_changed_settings_reach_the_proxy_by_reload(
    template: Template, tmp_path: Path, first_boot: Path
) -> None:
    """A deploy that changes reloadable settings (a carrier network, the timeout): the new release's
    install.sh writes them, keeps the host's values, opens the firewall, and reloads (SIGHUP) the
    proxy: no restart, no dropped call."""
    proc, calls = run_apply(template, tmp_path, first_boot, RELEASE, "r1", SITE_2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "systemctl reload clearip-proxy.service" in calls
    assert not [c for c in calls if "restart" in c or " start " in c]
    cfg = first_boot / "etc/clearip-proxy/settings.toml"
    tls = first_boot / "etc/clearip-proxy/tls"
    s = load(cfg, environ={}, overrides={"tls_cert": str(tls / "cert.pem"), "tls_key": str(tls / "key.pem")})
    assert s.allow == ("203.0.113.10/32", "192.0.2.0/24") and s.timeout == 3.0
    assert s.advertise == "198.51.100.7" and s.proxy_id == "i-0abc"  # the host's own, kept
    assert "192.0.2.0/24" in (first_boot / "etc/clearip-proxy/firewall.nft").read_text()
    assert "reloaded clearip-proxy.service" in proc.stdout and "listening on 5060" in proc.stdout
    # The same deploy again (the association re-runs when a target changes): nothing happens.
    proc, calls = run_apply(template, tmp_path, first_boot, RELEASE, "r1", SITE_2)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("unchanged")
    assert not [c for c in calls if "reload" in c or "restart" in c]


def test_a_new_release_reaches_the_proxy_by_drained_restart(
    template: Template, tmp_path: Path, first_boot: Path
) -> None:
    """A deploy that changes a file of the proxy: installed, recorded, and the proxy restarted (systemd
    stops it with SIGTERM, which answers new INVITEs 503 and drains calls in flight)."""
    release2 = tmp_path / "release2"
    shutil.copytree(RELEASE, release2)
    routing = release2 / "proxy_runtime/core/routing.py"
    routing.write_text(routing.read_text() + "\n# release 2\n")
    proc, calls = run_apply(template, tmp_path, first_boot, release2, "r2", SITE_1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "systemctl restart clearip-proxy.service" in calls
    assert not [c for c in calls if "reload" in c]
    assert "# release 2" in (first_boot / "opt/clearip-proxy/src/proxy_runtime/core/routing.py").read_text()
    assert (first_boot / "opt/clearip-proxy/release-id").read_text() == "r2\n"
    assert "restarting clearip-proxy.service (SIGTERM: calls in flight drain first)" in proc.stdout
    unit = UNIT.read_text()
    assert "KillSignal=SIGTERM" in unit and "TimeoutStopSec=45" in unit


def test_a_proxy_that_does_not_come_up_fails_the_step(
    template: Template, tmp_path: Path, first_boot: Path
) -> None:
    """Not listening after the restart: the step fails (so MaxErrors=0 stops the roll-out there)."""
    release2 = tmp_path / "release2"
    shutil.copytree(RELEASE, release2)
    (release2 / "proxy_runtime/core/routing.py").write_text(
        (release2 / "proxy_runtime/core/routing.py").read_text() + "\n# broken\n"
    )
    proc, calls = run_apply(template, tmp_path, first_boot, release2, "r2", SITE_1, listening=False)
    assert proc.returncode != 0
    assert "not active and listening on 5060" in proc.stderr
    assert "systemctl restart clearip-proxy.service" in calls


def test_refused_settings_change_nothing(template: Template, tmp_path: Path, first_boot: Path) -> None:
    cfg = first_boot / "etc/clearip-proxy/settings.toml"
    before = cfg.read_text()
    proc, calls = run_apply(template, tmp_path, first_boot, RELEASE, "r1", SITE_1.replace("/32", ""))
    assert proc.returncode != 0 and "bare address" in proc.stderr
    assert cfg.read_text() == before and not [c for c in calls if "reload" in c or "restart" in c]


# ---- the systemd unit ------------------------------------------------------------------------
def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    svc = unit["Service"]
    assert svc["ExecStart"] == (
        "/opt/clearip-proxy/venv/bin/clearip-proxy run --config /etc/clearip-proxy/settings.toml"
    )
    assert svc["Restart"] == "always"
    assert svc["KillSignal"] == "SIGTERM"
    # SIGTERM drains calls for up to drain_timeout, which the settings bound by this value.
    assert int(svc["TimeoutStopSec"]) == UNIT_TIMEOUT_STOP_SEC
    assert MAX_DRAIN_TIMEOUT + STOP_MARGIN == UNIT_TIMEOUT_STOP_SEC and STOP_MARGIN >= 10
    assert Settings(proxy_id="").drain_timeout <= MAX_DRAIN_TIMEOUT
    assert svc["User"] == "clearip-proxy" and svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict" and svc["CapabilityBoundingSet"] == ""
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    verify = require_tool("systemd-analyze", "Debian package systemd")
    proc = subprocess.run([verify, "verify", "--man=no", str(UNIT)], capture_output=True, text=True)
    # The venv binary does not exist on this machine; any other complaint is a real error.
    problems = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and "venv/bin/clearip-proxy" not in line and "Unit clearip-proxy" not in line
    ]
    assert problems == [], proc.stderr


# ---- a real virtual environment ------------------------------------------------------------
def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Every package index unreachable, no pip cache or config: only the release's wheels."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # nothing listens on the discard port
        "PIP_NO_CACHE_DIR": "1",
        **extra,
    }


def release_with_wheels() -> Path:
    wheels.download()  # make wheels: cached, checked against both locks
    shutil.copytree(REPO / "wheels", RELEASE / "wheels", dirs_exist_ok=True)
    return RELEASE


def frozen(venv: Path, env: dict[str, str]) -> set[str]:
    out = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout  # fmt: skip
    return {
        re.sub(r"[-_.]+", "-", line.replace(" @ ", "==").split("==")[0]).lower()
        for line in out.splitlines()
        if line
    }


def version(venv: Path, env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(venv / "bin/clearip-proxy"), "--version"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def offline_install(root: Path, python: str) -> list[str]:
    """install.sh into ``root`` from the release's wheels alone, with ``python``."""
    return [
        "bash",
        str(RELEASE / "deploy/install.sh"),
        "--root",
        str(root),
        "--offline",
        "--python",
        python,
        *ARGS,
    ]


@pytest.mark.slow
def test_real_venv_install_from_the_release_wheels_alone(tmp_path: Path) -> None:
    """Create the venv and install the runtime and the proxy from the release's hash-pinned wheels,
    with every package index made unreachable: boot needs nothing but the asset. gcc and the Python
    headers are there (as install.sh installs them on an instance): the core is compiled, by a mypy
    that stays in the throw-away build venv."""
    python = require_tool("python3.11", "Debian package python3.11")
    require_tool("gcc", "Debian packages gcc and python3.11-dev")
    release_with_wheels()
    env = offline_env(tmp_path)
    cmd = offline_install(tmp_path, python)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hash-pinned, no index" in proc.stdout
    venv = tmp_path / "opt/clearip-proxy/venv"
    assert (venv / "bin/clearip-proxy").is_file()
    # The compiled core runs, and the log says so.
    assert version(venv, env).endswith("(core compiled)")
    assert re.search(r"install.sh: installed clearip-proxy \S+ \(core compiled\) \(--core auto;", proc.stdout)
    assert list((venv / "lib/python3.11/site-packages/proxy_runtime/core").glob("proxy.cpython-311-*.so"))
    assert (tmp_path / "etc/clearip-proxy/core").read_text() == "auto\n"
    installed = frozen(venv, env)
    pins = set(wheels.locked_hashes())
    assert installed - {"pip"} == pins | {"clearip-proxy"}  # only the runtime's dependencies
    assert not {"mypy", "librt", "ast-serialize", "aws-cdk-lib", "pytest", "moto", "boto3"} & installed
    out = subprocess.run(
        [str(venv / "bin/clearip-proxy"), "check-config", "--allow", "203.0.113.10/32"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "usr/local/bin/clearip-proxy").is_symlink()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.stdout.strip().endswith("unchanged")  # no rebuild, so no restart


@pytest.mark.slow
def test_real_venv_install_falls_back_to_the_pure_core(tmp_path: Path) -> None:
    """No working C compiler (CC=false: every compile fails, as on a host where gcc could not be
    installed): the install still succeeds, with the pure-Python core, and says why. Then --pure: the
    kept mode changes, so the proxy is rebuilt (and would be restarted) without a compile. Before
    that, a run that finds the compiler working again (gcc installed since) rebuilds it compiled."""
    python = require_tool("python3.11", "Debian package python3.11")
    release_with_wheels()
    env = offline_env(tmp_path, CC="false")
    cmd = offline_install(tmp_path, python)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    venv = tmp_path / "opt/clearip-proxy/venv"
    assert version(venv, env).endswith("(core pure)")
    assert "install.sh: clearip-proxy: building pure Python: the C compile failed" in proc.stdout
    assert re.search(r"installed clearip-proxy \S+ \(core pure\) \(--core auto;", proc.stdout)
    assert not list((venv / "lib/python3.11/site-packages/proxy_runtime").rglob("*.so"))
    assert "mypy" not in frozen(venv, env)
    assert (tmp_path / "opt/clearip-proxy/build.log").is_file()  # the whole build, for the operator
    same = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert same.stdout.strip().endswith("unchanged")  # still no compiler: no rebuild, no restart
    healed_env = offline_env(tmp_path)  # the next roll-out finds gcc and the headers installed
    healed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=healed_env)
    assert healed.returncode == 0, healed.stdout + healed.stderr
    assert "changed: /opt/clearip-proxy/venv packages" in healed.stdout
    assert version(venv, env).endswith("(core compiled)")
    pure = subprocess.run([*cmd, "--pure"], capture_output=True, text=True, timeout=300, env=env)
    assert pure.returncode == 0, pure.stdout + pure.stderr
    assert (
        "changed: /etc/clearip-proxy/core" in pure.stdout
        and "changed: /opt/clearip-proxy/venv packages" in pure.stdout
    )
    assert "building pure Python" not in pure.stdout  # not attempted: no build venv, no mypyc
    assert (tmp_path / "etc/clearip-proxy/core").read_text() == "pure\n"
    assert version(venv, env).endswith("(core pure)")
    # The kept mode holds for a later run without the flag (the release association's).
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.stdout.strip().endswith("unchanged")


@pytest.mark.slow
def test_plain_pip_install_of_a_clean_copy_is_pure(tmp_path: Path) -> None:
    """`pip install .` as anyone would run it from a clean clone (build isolation, no
    CLEARIP_COMPILE): the pure-Python build, even with gcc and mypy on the machine."""
    python = require_tool("python3.11", "Debian package python3.11")
    release_with_wheels()
    # A clean clone: the tracked files only (as the work tree has them), no build/, .build/ or *.so.
    clone = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    assert (clone / "setup.py").is_file() and not list(clone.rglob("*.so"))
    env = offline_env(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, env=env)
    proc = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
         "--find-links", str(RELEASE / "wheels" / os.uname().machine), "--no-deps", str(clone)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert version(venv, env).endswith("(core pure)")
    assert not list((venv / "lib/python3.11/site-packages/proxy_runtime").rglob("*.so"))


@pytest.mark.slow
def test_a_compile_that_fails_part_way_builds_a_wholly_pure_wheel(tmp_path: Path) -> None:
    """CLEARIP_COMPILE=auto and a C compile that fails after mypyc's shared library and some
    modules were built (a full disk, a killed compiler): the wheel must carry no compiled module at
    all. A mixed core (some modules compiled, some not) reports itself "compiled" and raises
    TypeError where compiled and pure classes meet (an oversize message: no 513)."""
    require_tool("gcc", "Debian packages gcc and python3.11-dev")
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in *timers.c) exit 1;; esac; done\nexec gcc "$@"\n')
    cc.chmod(0o755)
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if name.startswith(("proxy_runtime/", "setup.py", "pyproject.toml")) and (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    env = dict(os.environ, CC=str(cc), CLEARIP_COMPILE="auto")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "clearip-proxy: building pure Python: the C compile failed" in proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("clearip_proxy-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert not [n for n in zf.namelist() if n.endswith(".so")]
