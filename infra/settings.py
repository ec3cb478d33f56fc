"""Deployment settings: read once from the site's settings file and the CDK context, validated, frozen.

The deployment's settings live in a file the operator keeps under version control: ``cdk.json``
names it (context key ``settings_file``, ``site.toml`` by default; a flat TOML whose keys are the
settings below, with a ``[proxy]`` table for any other setting of the proxy itself). A bare
``cdk deploy`` deploys exactly what the file says. A ``-c key=value`` overrides one key for that
run, explicitly. Every construct receives these values as typed keyword arguments; nothing under
``infra/`` reads the context or the file except :func:`DeploymentSettings.from_context`, called by
``app.py``. A bad value raises :class:`DeploymentSettingsError` naming the key, so ``cdk synth``
stops with a message an operator can act on (e.g. ``sip_cidrs = ["203.0.113.10/32"]``).

The rules the proxy also applies (a trusted CIDR, the ClearIP URI's transport, every ``[proxy]``
value) are the proxy's own code in :mod:`proxy_runtime.settings`, called from here.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy_runtime.settings import (
    CLEARIP_TRANSPORTS,
    DEFAULT_CLEARIP_URI,
    SettingsError,
    trusted_cidr,
    with_transport,
)
from proxy_runtime.settings.file import site_settings_toml

__all__ = ["DeploymentSettings", "DeploymentSettingsError", "with_transport"]

DEFAULT_SETTINGS_FILE = "site.toml"
# Keys of the proxy's own settings the stack sets from its top-level settings (or per host):
# they cannot also be given in the [proxy] table.
_STACK_PROXY_KEYS = {"allow": "sip_cidrs", "clearip": "clearip_uri", "timeout": "timeout", "metrics": ""}
# Keys of the proxy's own settings the stack cannot honour, and why: a roll-out with them would fail
# on the first proxy (its readiness check) or leave it unreachable, so synth refuses them.
_LISTENERS_FIXED = (
    "the stack's security group, the proxies' nftables rules and the roll-out's readiness check "
    "use UDP/TCP 5060 and TLS 5061 on every address; remove it from [proxy]"
)
_UNSUPPORTED_PROXY_KEYS = {
    "udp": _LISTENERS_FIXED,
    "tcp": _LISTENERS_FIXED,
    "tls": _LISTENERS_FIXED,
    "clearip_ca": "names a file on the proxies, which the stack does not install (the roll-out would "
    "stop at the first proxy); ClearIP's certificate is verified against the system CAs: remove it "
    "from [proxy]",
}
# Each trusted CIDR costs three ingress rules (UDP 5060, TCP 5060, TCP 5061); a security group
# holds 60 inbound rules by default, minus one for SSH.
MAX_SIP_CIDRS = 19
_EMAIL = re.compile(r"^[^@\s,;]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$")
_STACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
_KEY_PAIR = re.compile(r"^[\x20-\x7e]{1,255}$")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
_AMI = re.compile(r"^ami-[0-9a-f]{8,17}$")
_ALLOCATION = re.compile(r"^eipalloc-[0-9a-f]{8,17}$")
AMI_HINT = (
    "the Amazon Linux 2023 image id the proxies run, recorded so it changes only when you ask; the "
    "current one: aws ssm get-parameter --name "
    "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64 --query Parameter.Value "
    "--output text (arm64 for Graviton instance types)"
)


class DeploymentSettingsError(ValueError):
    """A setting is wrong. ``setting`` is the key to fix (in the settings file or a ``-c`` flag)."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"setting {setting!r}: {problem}")
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
    ami: str
    """The machine image of every proxy (an AMI id); a change replaces the proxies one at a time."""
    ssh_cidr: str | None = None
    alarm_email: str | None = None
    """None: deliberately no e-mail subscription (the file says ``alarm_email = ""``)."""
    proxy_count: int = 2
    instance_type: str = "t3.medium"
    key_pair: str | None = None
    clearip_uri: str = DEFAULT_CLEARIP_URI
    clearip_transport: str = "tls"
    timeout: float = 5.0
    stack_name: str = "ClearIpProxy"
    eip_allocations: tuple[tuple[str, str], ...] = ()
    """Existing Elastic IPs to adopt as (allocation id, address), in proxy order (Proxy1 first);
    proxies beyond them get new addresses. Every address is retained when the stack is deleted.
    The address is given too: the proxy advertises it from its first boot, before it holds it."""
    proxy_settings: tuple[tuple[str, Any], ...] = ()
    """Other settings of the proxy itself (the file's ``[proxy]`` table), e.g. ``ring_timeout``."""
    thresholds: AlarmThresholds = field(default_factory=AlarmThresholds)

    def __post_init__(self) -> None:
        _check_cidrs(self.sip_cidrs)
        if not _AMI.match(self.ami):
            raise DeploymentSettingsError("ami", f"{self.ami!r} is not an AMI id: {AMI_HINT}")
        for alloc, address in self.eip_allocations:
            if not _ALLOCATION.match(alloc):
                raise DeploymentSettingsError(
                    "eip_allocations", f"{alloc!r} is not an Elastic IP allocation id (eipalloc-...)"
                )
            try:
                if ipaddress.ip_address(address).version != 4:
                    raise ValueError
            except ValueError:
                raise DeploymentSettingsError(
                    "eip_allocations", f"{address!r} (of {alloc}) is not an IPv4 address"
                ) from None
        if len({a for a, _ in self.eip_allocations}) != len(self.eip_allocations):
            raise DeploymentSettingsError("eip_allocations", "lists an allocation twice")
        if len(self.eip_allocations) > self.proxy_count:
            raise DeploymentSettingsError(
                "eip_allocations",
                f"{len(self.eip_allocations)} allocations for {self.proxy_count} proxies",
            )
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
        for key, _value in self.proxy_settings:
            if key in _STACK_PROXY_KEYS:
                top = _STACK_PROXY_KEYS[key]
                raise DeploymentSettingsError(
                    f"proxy.{key}",
                    f"set by the stack{f' from {top!r}' if top else ''}; remove it from [proxy]",
                )
            if key in _UNSUPPORTED_PROXY_KEYS:
                raise DeploymentSettingsError(f"proxy.{key}", _UNSUPPORTED_PROXY_KEYS[key])
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
        # Last: the proxies' own settings, judged by the proxy's code (what install.sh runs too).
        try:
            self.site_settings_toml()
        except SettingsError as exc:
            raise DeploymentSettingsError(f"proxy.{exc.setting}", exc.problem) from None

    @property
    def proxy_clearip_uri(self) -> str:
        """The URI the proxies use: ``clearip_uri`` with its transport set to ``clearip_transport``."""
        return with_transport(self.clearip_uri, self.clearip_transport)

    def site_settings_toml(self) -> str:
        """The proxies' settings file for this site (no host fields), validated by the proxy's code."""
        return site_settings_toml(
            {
                "allow": list(self.sip_cidrs),
                "clearip": self.proxy_clearip_uri,
                "timeout": self.timeout,
                "metrics": "cloudwatch",
                **dict(self.proxy_settings),
            }
        )

    @classmethod
    def from_context(cls, get: Callable[[str], Any], base_dir: Path | None = None) -> DeploymentSettings:
        """Build from a context getter (``app.node.try_get_context``; absent keys return None).

        The file named by the ``settings_file`` key (``site.toml`` by default, relative to
        ``base_dir``, the app's directory) gives every value; a key present in the context wins."""
        name = get("settings_file")
        path = (base_dir or Path.cwd()) / str(name or DEFAULT_SETTINGS_FILE)
        file: dict[str, Any] = {}
        if path.is_file():
            try:
                file = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise DeploymentSettingsError("settings_file", f"{path} is not valid TOML: {exc}") from None
        elif name is not None and get("sip_cidrs") is None:
            raise DeploymentSettingsError(
                "settings_file", f"{path}: no such file (copy site.example.toml to {path.name} and edit it)"
            )
        known = {*cls.__dataclass_fields__, "proxy", "clearip_uri", "settings_file"}
        known |= {f"alarm_{f}" for f in AlarmThresholds.__dataclass_fields__}
        for key in file:
            if key not in known:
                raise DeploymentSettingsError(key, f"unknown setting in {path.name}")
        where = f" in {path.name}" if file else f" in {path.name} (or -c {{key}}=...)"

        def value(key: str) -> Any:
            v = get(key)
            return file.get(key) if v is None else v

        return cls._build(value, where)

    @classmethod
    def _build(cls, get: Callable[[str], Any], where: str) -> DeploymentSettings:
        sip = get("sip_cidrs")
        if sip is None:
            raise DeploymentSettingsError(
                "sip_cidrs",
                "required: the CIDRs of the switches/carriers allowed to send SIP, "
                f'e.g. sip_cidrs = ["203.0.113.10/32"]{where.format(key="sip_cidrs")}',
            )
        ami = get("ami")
        if ami is None:
            raise DeploymentSettingsError("ami", f"required{where.format(key='ami')}: {AMI_HINT}")
        email = get("alarm_email")
        if email is None:
            raise DeploymentSettingsError(
                "alarm_email",
                f'required{where.format(key="alarm_email")}: the address the alarms mail, or "" to '
                "deploy without one (an absent value would silently delete the subscription)",
            )
        proxy = get("proxy") or {}
        if not isinstance(proxy, Mapping):
            raise DeploymentSettingsError("proxy", f"expected a table of proxy settings, got {proxy!r}")
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
            ami=str(ami).strip(),
            ssh_cidr=_opt_str(get, "ssh_cidr"),
            alarm_email=None if str(email).strip().lower() in ("", "none") else str(email).strip(),
            proxy_count=_int(get, "proxy_count", 2),
            instance_type=_opt_str(get, "instance_type") or "t3.medium",
            key_pair=_opt_str(get, "key_pair"),
            clearip_uri=_opt_str(get, "clearip_uri") or DEFAULT_CLEARIP_URI,
            clearip_transport=(_opt_str(get, "clearip_transport") or "tls").lower(),
            timeout=_float(get, "timeout", 5.0),
            stack_name=_opt_str(get, "stack_name") or "ClearIpProxy",
            eip_allocations=_allocations(get("eip_allocations")),
            proxy_settings=tuple(sorted(proxy.items())),
            thresholds=th,
        )

    @classmethod
    def from_mapping(cls, context: Mapping[str, Any]) -> DeploymentSettings:
        """From one mapping of settings (tests, and the file's own keys): no file is read."""
        return cls._build(context.get, "")


def _check_cidr(setting: str, value: str) -> None:
    try:
        trusted_cidr(setting, value)
    except SettingsError as exc:
        raise DeploymentSettingsError(setting, exc.problem) from None


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


def _allocations(value: Any) -> tuple[tuple[str, str], ...]:
    """``eipalloc-...=198.51.100.7`` items (a comma-separated string or a list), or a list of tables
    ``{allocation_id = "eipalloc-...", address = "198.51.100.7"}`` (the settings file's form)."""
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise DeploymentSettingsError("eip_allocations", f"expected a list, got {value!r}")
    out = []
    for item in items:
        if isinstance(item, Mapping) and set(item) == {"allocation_id", "address"}:
            out.append((str(item["allocation_id"]).strip(), str(item["address"]).strip()))
        elif isinstance(item, str) and item.count("=") == 1:
            alloc, address = item.split("=")
            out.append((alloc.strip(), address.strip()))
        else:
            raise DeploymentSettingsError(
                "eip_allocations",
                f"{item!r}: give allocation_id and address (eipalloc-0123456789abcdef0=198.51.100.7)",
            )
    return tuple(out)


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
