"""Deployment settings: read once from CDK context, validated, frozen.

Every construct receives these values as typed keyword arguments; nothing under ``infra/`` reads
the CDK context except :func:`DeploymentSettings.from_context`, called by ``app.py``. A bad value
raises :class:`DeploymentSettingsError` naming the context key, so ``cdk synth`` stops with a
message an operator can act on (e.g. ``-c sip_cidrs=203.0.113.10/32``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CLEARIP_URI = "sip:sip.clearip.com:5061;transport=tls"
CLEARIP_TRANSPORTS = ("tls", "tcp")
# ClearIP's standard ports per transport: switching transport also switches a standard port.
_TRANSPORT_PORTS = {"tls": 5061, "tcp": 5060}
# Each trusted CIDR costs three ingress rules (UDP 5060, TCP 5060, TCP 5061); a security group
# holds 60 inbound rules by default, minus one for SSH.
MAX_SIP_CIDRS = 19
_EMAIL = re.compile(r"^[^@\s,;]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$")
_STACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
_KEY_PAIR = re.compile(r"^[\x20-\x7e]{1,255}$")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")


class DeploymentSettingsError(ValueError):
    """A context value is wrong. ``setting`` is the CDK context key to fix."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"context setting {setting!r}: {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True, slots=True)
class AlarmThresholds:
    """When the alarms fire. Context keys carry the ``alarm_`` prefix (``-c alarm_clearip_timeouts=20``)."""

    clearip_timeouts: int = 10
    """ClearIP timeouts per proxy in 5 minutes above which the timeout alarm fires."""
    failed_call_percent: float = 5.0
    """Percentage of calls the proxy itself failed, over 5 minutes, above which the ratio alarm fires."""
    failed_call_min_calls: int = 20
    """Below this many calls in 5 minutes the failure ratio is not judged (1 failure in 3 is noise)."""
    heartbeat_missing_minutes: int = 3
    """Minutes without a heartbeat before the heartbeat alarm fires."""
    clearip_down_minutes: int = 2
    """Minutes with the ClearIP connection down before the unreachable alarm fires."""


@dataclass(frozen=True, slots=True)
class DeploymentSettings:
    sip_cidrs: tuple[str, ...]
    ssh_cidr: str | None = None
    alarm_email: str | None = None
    proxy_count: int = 2
    instance_type: str = "t3.medium"
    key_pair: str | None = None
    clearip_uri: str = DEFAULT_CLEARIP_URI
    clearip_transport: str = "tls"
    timeout: float = 5.0
    stack_name: str = "ClearIpProxy"
    thresholds: AlarmThresholds = field(default_factory=AlarmThresholds)

    def __post_init__(self) -> None:
        _check_cidrs(self.sip_cidrs)
        if self.ssh_cidr is not None:
            _check_cidr("ssh_cidr", self.ssh_cidr)
        if self.alarm_email is not None and not _EMAIL.match(self.alarm_email):
            raise DeploymentSettingsError("alarm_email", f"{self.alarm_email!r} is not an e-mail address")
        if self.proxy_count < 2:
            raise DeploymentSettingsError(
                "proxy_count", f"must be at least 2 (one per availability zone), got {self.proxy_count}"
            )
        if self.proxy_count > 10:
            raise DeploymentSettingsError("proxy_count", f"must be at most 10, got {self.proxy_count}")
        if not _INSTANCE_TYPE.match(self.instance_type):
            raise DeploymentSettingsError(
                "instance_type", f"{self.instance_type!r} is not an EC2 instance type (e.g. t3.medium)"
            )
        if self.key_pair is not None and not _KEY_PAIR.match(self.key_pair):
            raise DeploymentSettingsError("key_pair", f"{self.key_pair!r} is not an EC2 key pair name")
        if self.clearip_transport not in CLEARIP_TRANSPORTS:
            raise DeploymentSettingsError(
                "clearip_transport", f"must be tls or tcp, got {self.clearip_transport!r}"
            )
        if not re.match(r"^sips?:[^\s\"]+$", self.clearip_uri):
            raise DeploymentSettingsError("clearip_uri", f"{self.clearip_uri!r} is not a SIP URI")
        if not 0 < self.timeout <= 60:
            raise DeploymentSettingsError(
                "timeout", f"must be greater than 0 and at most 60 seconds, got {self.timeout}"
            )
        if not _STACK_NAME.match(self.stack_name):
            raise DeploymentSettingsError(
                "stack_name", f"{self.stack_name!r}: letters, digits and hyphens, starting with a letter"
            )
        t = self.thresholds
        if t.clearip_timeouts < 0:
            raise DeploymentSettingsError("alarm_clearip_timeouts", "must not be negative")
        if not 0 < t.failed_call_percent <= 100:
            raise DeploymentSettingsError("alarm_failed_call_percent", "must be in (0, 100]")
        if t.failed_call_min_calls < 1:
            raise DeploymentSettingsError("alarm_failed_call_min_calls", "must be at least 1")
        if t.heartbeat_missing_minutes < 1:
            raise DeploymentSettingsError("alarm_heartbeat_missing_minutes", "must be at least 1")
        if t.clearip_down_minutes < 1:
            raise DeploymentSettingsError("alarm_clearip_down_minutes", "must be at least 1")

    @property
    def proxy_clearip_uri(self) -> str:
        """The URI the proxies use: ``clearip_uri`` with its transport set to ``clearip_transport``."""
        return with_transport(self.clearip_uri, self.clearip_transport)

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> DeploymentSettings:
        """Build from a context getter (``app.node.try_get_context``); absent keys return None."""
        sip = get("sip_cidrs")
        if sip is None:
            raise DeploymentSettingsError(
                "sip_cidrs",
                "required: the CIDRs of the switches/carriers allowed to send SIP, "
                "e.g. -c sip_cidrs=203.0.113.10/32,198.51.100.0/28",
            )
        d = AlarmThresholds()
        th = AlarmThresholds(
            clearip_timeouts=_int(get, "alarm_clearip_timeouts", d.clearip_timeouts),
            failed_call_percent=_float(get, "alarm_failed_call_percent", d.failed_call_percent),
            failed_call_min_calls=_int(get, "alarm_failed_call_min_calls", d.failed_call_min_calls),
            heartbeat_missing_minutes=_int(
                get, "alarm_heartbeat_missing_minutes", d.heartbeat_missing_minutes
            ),
            clearip_down_minutes=_int(get, "alarm_clearip_down_minutes", d.clearip_down_minutes),
        )
        return cls(
            sip_cidrs=_cidr_list(sip),
            ssh_cidr=_opt_str(get, "ssh_cidr"),
            alarm_email=_opt_str(get, "alarm_email"),
            proxy_count=_int(get, "proxy_count", 2),
            instance_type=_opt_str(get, "instance_type") or "t3.medium",
            key_pair=_opt_str(get, "key_pair"),
            clearip_uri=_opt_str(get, "clearip_uri") or DEFAULT_CLEARIP_URI,
            clearip_transport=(_opt_str(get, "clearip_transport") or "tls").lower(),
            timeout=_float(get, "timeout", 5.0),
            stack_name=_opt_str(get, "stack_name") or "ClearIpProxy",
            thresholds=th,
        )

    @classmethod
    def from_mapping(cls, context: Mapping[str, Any]) -> DeploymentSettings:
        return cls.from_context(context.get)


def with_transport(uri: str, transport: str) -> str:
    """Set ``;transport=`` of a SIP URI; a standard port of the other transport follows (5061 <-> 5060)."""
    base, sep, params = uri.partition(";")
    kept = [p for p in params.split(";") if p and not p.lower().startswith("transport=")] if sep else []
    other = "tcp" if transport == "tls" else "tls"
    m = re.match(r"^(sips?:(?:[^@]*@)?(?:\[[^\]]+\]|[^:]+)):(\d+)$", base)
    if m and int(m.group(2)) == _TRANSPORT_PORTS[other]:
        base = f"{m.group(1)}:{_TRANSPORT_PORTS[transport]}"
    return ";".join([base, *kept, f"transport={transport}"])


def _check_cidr(setting: str, value: str) -> None:
    if "/" not in value:
        raise DeploymentSettingsError(
            setting, f"{value!r} is a bare address; write it as a CIDR with a prefix, e.g. {value}/32"
        )
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        try:
            fixed = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise DeploymentSettingsError(setting, f"{value!r} is not a CIDR ({exc})") from None
        raise DeploymentSettingsError(
            setting, f"{value!r} has host bits set; did you mean {fixed}?"
        ) from None
    if net.prefixlen == 0:
        raise DeploymentSettingsError(
            setting, f"{value} admits the whole internet; list only your trusted switches and carriers"
        )


def _check_cidrs(cidrs: tuple[str, ...]) -> None:
    if not cidrs:
        raise DeploymentSettingsError(
            "sip_cidrs", "is empty: give at least one trusted CIDR, e.g. -c sip_cidrs=203.0.113.10/32"
        )
    for c in cidrs:
        _check_cidr("sip_cidrs", c)
    if len(set(cidrs)) != len(cidrs):
        raise DeploymentSettingsError("sip_cidrs", "lists a CIDR twice")
    if len(cidrs) > MAX_SIP_CIDRS:
        raise DeploymentSettingsError(
            "sip_cidrs", f"at most {MAX_SIP_CIDRS} CIDRs fit one security group (got {len(cidrs)})"
        )


def _cidr_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    raise DeploymentSettingsError("sip_cidrs", f"expected a comma-separated string or a list, got {value!r}")


def _opt_str(get: Callable[[str], Any], key: str) -> str | None:
    value = get(key)
    if value is None:
        return None
    if not isinstance(value, str | int | float):
        raise DeploymentSettingsError(key, f"expected a string, got {value!r}")
    s = str(value).strip()
    return s or None


def _int(get: Callable[[str], Any], key: str, default: int) -> int:
    value = get(key)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise DeploymentSettingsError(key, f"expected a whole number, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DeploymentSettingsError(key, f"expected a whole number, got {value!r}") from None
    if not f.is_integer():
        raise DeploymentSettingsError(key, f"expected a whole number, got {value!r}")
    return int(f)


def _float(get: Callable[[str], Any], key: str, default: float) -> float:
    value = get(key)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise DeploymentSettingsError(key, f"expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DeploymentSettingsError(key, f"expected a number, got {value!r}") from None
