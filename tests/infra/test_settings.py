"""Deployment settings are validated once, at synth, with messages that name the context key."""

from __future__ import annotations

from typing import Any

import pytest

import app as cdk_app
from infra.settings import DeploymentSettings, DeploymentSettingsError, with_transport


def settings(**context: Any) -> DeploymentSettings:
    return DeploymentSettings.from_mapping({"sip_cidrs": "203.0.113.10/32", **context})


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
        cdk_app.build_app({"sip_cidrs": "0.0.0.0/0"})
    with pytest.raises(DeploymentSettingsError, match="proxy_count"):
        cdk_app.build_app({"sip_cidrs": "203.0.113.10/32", "proxy_count": 1})
