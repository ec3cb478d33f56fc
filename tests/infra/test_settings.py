"""Deployment settings: the site's settings file (named by cdk.json), explicit -c overrides, and
validation once, at synth, with messages that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import app as cdk_app
from infra.settings import DeploymentSettings, DeploymentSettingsError, with_transport


def settings(**context: Any) -> DeploymentSettings:
    return DeploymentSettings.from_mapping(
        {"sip_cidrs": "203.0.113.10/32", "ami": "ami-0123456789abcdef0", "alarm_email": "", **context}
    )


def test_defaults() -> None:
    s = settings()
    assert s.sip_cidrs == ("203.0.113.10/32",)
    assert s.ssh_cidr is None and s.alarm_email is None and s.key_pair is None
    assert s.proxy_count == 2
    assert s.instance_type == "t3.medium"
    assert s.clearip_transport == "tls"
    assert s.proxy_clearip_uri == "sip:sip.clearip.com:5061;transport=tls"
    assert s.timeout == 5.0


def test_sip_cidrs_as_string_or_list() -> None:
    assert settings(sip_cidrs=" 203.0.113.10/32 , 198.51.100.0/28").sip_cidrs == (
        "203.0.113.10/32",
        "198.51.100.0/28",
    )
    assert settings(sip_cidrs=["2001:db8::/48"]).sip_cidrs == ("2001:db8::/48",)


@pytest.mark.parametrize(
    ("context", "setting", "fragment"),
    [
        ({"sip_cidrs": "203.0.113.10"}, "sip_cidrs", "bare address"),
        ({"sip_cidrs": "0.0.0.0/0"}, "sip_cidrs", "whole internet"),
        ({"sip_cidrs": "::/0"}, "sip_cidrs", "whole internet"),
        ({"sip_cidrs": ""}, "sip_cidrs", "is empty"),
        ({"sip_cidrs": []}, "sip_cidrs", "is empty"),
        ({"sip_cidrs": "203.0.113.10/24"}, "sip_cidrs", "did you mean 203.0.113.0/24"),
        ({"sip_cidrs": "example.com/32"}, "sip_cidrs", "not a CIDR"),
        ({"sip_cidrs": "10.0.0.0/8,10.0.0.0/8"}, "sip_cidrs", "twice"),
        ({"sip_cidrs": ",".join(f"10.0.{i}.0/24" for i in range(20))}, "sip_cidrs", "at most"),
        ({"ssh_cidr": "0.0.0.0/0"}, "ssh_cidr", "whole internet"),
        ({"ssh_cidr": "192.0.2.1"}, "ssh_cidr", "bare address"),
        ({"alarm_email": "noc"}, "alarm_email", "not an e-mail"),
        ({"proxy_count": 1}, "proxy_count", "at least 2"),
        ({"proxy_count": "two"}, "proxy_count", "whole number"),
        ({"instance_type": "big"}, "instance_type", "instance type"),
        ({"clearip_transport": "udp"}, "clearip_transport", "tls or tcp"),
        ({"clearip_uri": "http://x"}, "clearip_uri", "not a SIP URI"),
        ({"timeout": 0}, "timeout", "greater than 0"),
        ({"timeout": 61}, "timeout", "at most 60"),
        ({"timeout": "soon"}, "timeout", "number"),
        ({"stack_name": "1bad"}, "stack_name", "letters"),
        ({"alarm_failed_call_percent": 0}, "alarm_failed_call_percent", "(0, 100]"),
        ({"ami": "latest"}, "ami", "not an AMI id"),
        ({"eip_allocations": "eipalloc-1"}, "eip_allocations", "allocation_id and address"),
        ({"eip_allocations": "eipalloc-zz=198.51.100.7"}, "eip_allocations", "not an Elastic IP allocation"),
        ({"eip_allocations": "eipalloc-0a1b2c3d4e5f60718=2001:db8::1"}, "eip_allocations", "not an IPv4"),
        (
            {"eip_allocations": ",".join(f"eipalloc-0a1b2c3d4e5f6071{i}=198.51.100.{i}" for i in range(3))},
            "eip_allocations",
            "3 allocations for 2 proxies",
        ),
        ({"proxy": {"ring_timeout": 0}}, "proxy.ring_timeout", "greater than 0"),
        ({"proxy": {"timeout": 3}}, "proxy.timeout", "set by the stack from 'timeout'"),
        ({"proxy": {"advertise": "192.0.2.1"}}, "proxy.advertise", "belongs to one host"),
        ({"proxy": {"bogus": 1}}, "proxy.bogus", "unknown setting"),
        ({"proxy": {"udp": ["0.0.0.0:5070"]}}, "proxy.udp", "5060"),
        ({"proxy": {"tls": ["0.0.0.0:5062"]}}, "proxy.tls", "readiness check"),
        ({"proxy": {"clearip_ca": "/etc/ssl/clearip.pem"}}, "proxy.clearip_ca", "system CAs"),
        ({"proxy": {"drain_timeout": 600}}, "proxy.drain_timeout", "systemd kills the proxy 45 s"),
        ({"proxy": {"metrics_interval": 300}}, "proxy.metrics_interval", "heartbeat alarm"),
    ],
)
def test_invalid_settings_name_the_setting(context: dict[str, Any], setting: str, fragment: str) -> None:
    with pytest.raises(DeploymentSettingsError) as err:
        settings(**context)
    assert err.value.setting == setting
    assert setting in str(err.value)
    assert fragment in str(err.value)


def test_sip_cidrs_is_required() -> None:
    with pytest.raises(DeploymentSettingsError, match="'sip_cidrs': required"):
        DeploymentSettings.from_mapping({})


def test_ami_and_alarm_email_must_be_said() -> None:
    """The image is recorded, and dropping the e-mail subscription is a decision, never an omission."""
    with pytest.raises(DeploymentSettingsError, match=r"'ami': required.*ami-amazon-linux-latest"):
        DeploymentSettings.from_mapping({"sip_cidrs": "203.0.113.10/32", "alarm_email": ""})
    with pytest.raises(DeploymentSettingsError, match=r"'alarm_email': required.*silently delete"):
        DeploymentSettings.from_mapping({"sip_cidrs": "203.0.113.10/32", "ami": "ami-0123456789abcdef0"})
    assert settings(alarm_email="").alarm_email is None
    assert settings(alarm_email="none").alarm_email is None
    assert settings(alarm_email="noc@example.net").alarm_email == "noc@example.net"


SITE = """
sip_cidrs = ["203.0.113.10/32", "198.51.100.0/28"]
alarm_email = "noc@example.net"
ami = "ami-0123456789abcdef0"
timeout = 4

[[eip_allocations]]
allocation_id = "eipalloc-0a1b2c3d4e5f60718"
address = "198.51.100.7"

[proxy]
ring_timeout = 120
"""


def test_the_settings_file_is_the_deployment(tmp_path: Path) -> None:
    (tmp_path / "site.toml").write_text(SITE)
    context: dict[str, Any] = {"settings_file": "site.toml"}
    s = DeploymentSettings.from_context(context.get, base_dir=tmp_path)
    assert s.sip_cidrs == ("203.0.113.10/32", "198.51.100.0/28")
    assert s.alarm_email == "noc@example.net" and s.ami == "ami-0123456789abcdef0" and s.timeout == 4.0
    assert s.eip_allocations == (("eipalloc-0a1b2c3d4e5f60718", "198.51.100.7"),)
    assert "ring_timeout = 120.0" in s.site_settings_toml()
    # -c overrides one key, explicitly; the rest still comes from the file.
    context["timeout"] = "2.5"
    s2 = DeploymentSettings.from_context(context.get, base_dir=tmp_path)
    assert s2.timeout == 2.5 and s2.alarm_email == "noc@example.net"
    assert "timeout = 2.5" in s2.site_settings_toml()


def test_settings_file_errors_name_the_key(tmp_path: Path) -> None:
    context: dict[str, Any] = {"settings_file": "site.toml"}
    with pytest.raises(DeploymentSettingsError, match=r"no such file.*site.example.toml"):
        DeploymentSettings.from_context(context.get, base_dir=tmp_path)
    (tmp_path / "site.toml").write_text("timout = 3\n" + SITE)
    with pytest.raises(DeploymentSettingsError, match=r"'timout': unknown setting in site.toml"):
        DeploymentSettings.from_context(context.get, base_dir=tmp_path)
    (tmp_path / "site.toml").write_text(SITE.replace('alarm_email = "noc@example.net"', ""))
    with pytest.raises(DeploymentSettingsError, match=r"'alarm_email': required in site.toml"):
        DeploymentSettings.from_context(context.get, base_dir=tmp_path)


def test_the_example_settings_file_is_valid(tmp_path: Path) -> None:
    from .conftest import REPO

    context: dict[str, Any] = {"settings_file": str(REPO / "site.example.toml")}
    s = DeploymentSettings.from_context(context.get, base_dir=tmp_path)
    assert s.sip_cidrs and s.alarm_email == "noc@example.net"


def test_transport_rewrites_the_uri() -> None:
    assert settings(clearip_transport="tcp").proxy_clearip_uri == "sip:sip.clearip.com:5060;transport=tcp"
    assert (
        settings(clearip_uri="sip:acme.sip.clearip.com:7000;lr", clearip_transport="tcp").proxy_clearip_uri
        == "sip:acme.sip.clearip.com:7000;lr;transport=tcp"
    )
    assert with_transport("sip:sip.clearip.com;transport=tcp", "tls") == "sip:sip.clearip.com;transport=tls"
    assert (
        with_transport("sip:[2001:db8::1]:5060;transport=tcp", "tls")
        == "sip:[2001:db8::1]:5061;transport=tls"
    )


def test_the_runtime_accepts_the_rewritten_uri() -> None:
    from proxy_runtime.settings import load

    for transport in ("tls", "tcp"):
        uri = settings(clearip_transport=transport).proxy_clearip_uri
        assert load(None, environ={}, overrides={"clearip": uri}).clearip == uri


def test_app_stops_at_synth_with_the_settings_error() -> None:
    """The CDK entry point validates before building anything (the CLI test checks the exit code)."""
    with pytest.raises(DeploymentSettingsError, match="sip_cidrs"):
        cdk_app.build_app({"sip_cidrs": "0.0.0.0/0", "ami": "ami-0123456789abcdef0", "alarm_email": ""})
    with pytest.raises(DeploymentSettingsError, match="proxy_count"):
        cdk_app.build_app(
            {
                "sip_cidrs": "203.0.113.10/32",
                "ami": "ami-0123456789abcdef0",
                "alarm_email": "",
                "proxy_count": 1,
            }
        )


def test_one_copy_of_each_rule(tmp_path: Path) -> None:
    """The CDK settings use the proxy's own rules, and the installed CLI's `set` gives the same URI."""
    import proxy_runtime.settings as runtime
    from infra import settings as infra_settings
    from proxy_runtime.settings.file import set_value

    assert infra_settings.with_transport is runtime.with_transport
    cfg = tmp_path / "settings.toml"
    cfg.write_text('clearip = "sip:acme.sip.clearip.com:5061;transport=tls"\n')
    set_value(cfg, "clearip_transport", "tcp")
    uri = settings(clearip_uri="sip:acme.sip.clearip.com:5061;transport=tls", clearip_transport="tcp")
    assert runtime.load(cfg, environ={}).clearip == uri.proxy_clearip_uri
