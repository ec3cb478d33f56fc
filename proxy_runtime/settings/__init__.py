"""One validated, frozen settings object, from a TOML file, the environment and flags (flags win).

The settings file is flat TOML whose keys are the field names of :class:`Settings`; the environment
uses ``CLEARIP_PROXY_<FIELD>`` (lists comma-separated); flags are the CLI's. A bad value raises
:class:`SettingsError` naming the setting, and start-up stops with that message.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from proxy_runtime.sip.uri import SipUri, UriError, parse_uri

ENV_PREFIX = "CLEARIP_PROXY_"
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
DEFAULT_CLEARIP_URI = "sip:sip.clearip.com:5061;transport=tls"
DEFAULT_COPY_HEADERS = ("Identity", "P-Asserted-Identity")
DEFAULT_REDIRECT_CODES = (300, 302)
FOLLOWABLE_REDIRECT_CODES = (300, 301, 302)  # 305 and 380 name no carrier to call
DEFAULT_EMERGENCY_NUMBERS = ("911", "933")
METRICS_SINKS = ("auto", "cloudwatch", "log", "off")
EMERGENCY_ACTIONS = ("reject", "route")
CLEARIP_TRANSPORTS = ("tls", "tcp")
# ClearIP's standard ports per transport: switching transport also switches a standard port.
TRANSPORT_PORTS = {"tls": 5061, "tcp": 5060}
# systemd's stop timeout in deploy/clearip-proxy.service (TimeoutStopSec; a test reads the unit):
# SIGKILL follows SIGTERM after it. The drain must end STOP_MARGIN seconds before that, leaving time
# to answer the calls still waiting, close the listeners and flush the last metrics.
UNIT_TIMEOUT_STOP_SEC = 45
STOP_MARGIN = 10
MAX_DRAIN_TIMEOUT = UNIT_TIMEOUT_STOP_SEC - STOP_MARGIN
# The heartbeat alarm (infra/monitoring.py) expects a datapoint in every 1-minute period and treats
# a missing one as the proxy down, so a longer interval would keep it firing.
MAX_METRICS_INTERVAL = 60

RESTART_ONLY_FIELDS = (
    "udp",
    "tcp",
    "tls",
    "tls_cert",
    "tls_key",
    "advertise",
    "clearip",
    "clearip_ca",
    "clearip_server_name",
    "max_message_size",
    "metrics",
    "proxy_id",
)
"""Settings read once when the listeners, the ClearIP link and the metrics sink are made: a change
needs a (drained) restart. Every other field is applied by a reload (SIGHUP) without dropping calls."""

HOST_FIELDS = ("advertise", "proxy_id", "tls_cert", "tls_key")
"""Settings that belong to one host, not to the site: a site settings file never carries them, and
``settings write --site`` keeps the host's values (the Elastic IP, the instance id, its certificate)."""


class SettingsError(ValueError):
    """A setting has a bad value. ``setting`` names it; the message says what is wrong."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"setting {setting!r}: {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    # Listeners. Empty tuples mean "not opened". When none of udp/tcp/tls is given anywhere, the
    # defaults apply: UDP and TCP on 0.0.0.0:5060, and TLS on 0.0.0.0:5061 when a cert is set.
    udp: tuple[HostPort, ...] = ()
    tcp: tuple[HostPort, ...] = ()
    tls: tuple[HostPort, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    advertise: str = ""  # public address for 1:1 NAT (EC2 Elastic IP); "" = the bound address
    # ClearIP.
    clearip: str = DEFAULT_CLEARIP_URI
    clearip_ca: str = ""  # CA bundle to verify ClearIP's certificate; "" = the system CAs
    clearip_server_name: str = ""  # TLS server name to verify; "" = the URI's host
    timeout: float = 5.0  # ClearIP answer timeout, and no-provisional timeout per carrier Contact
    keepalive_interval: float = 20.0  # RFC 5626 CRLF keep-alive on the ClearIP connection
    reconnect_max: float = 10.0  # cap of the reconnect backoff
    # A call that finds the ClearIP link down makes the proxy connect at once and waits up to this
    # for it (a refused connect answers 503 at once); never more than half of `timeout`.
    clearip_connect_wait: float = 0.5
    # Brownout breaker (docs/FAULTS.md): after `breaker_threshold` consecutive ClearIP timeouts
    # within `breaker_window` s, 503 at once for `breaker_cool_off` s, then one call in
    # `breaker_probe_every` goes to ClearIP as a probe until one is answered. Threshold 0 = off.
    breaker_threshold: int = 5
    breaker_window: float = 30.0
    breaker_cool_off: float = 10.0
    breaker_probe_every: int = 10
    # Routing.
    ring_timeout: float = 180.0
    copy_headers: tuple[str, ...] = DEFAULT_COPY_HEADERS
    redirect_codes: tuple[int, ...] = DEFAULT_REDIRECT_CODES  # ClearIP answers followed to its Contacts
    emergency_numbers: tuple[str, ...] = DEFAULT_EMERGENCY_NUMBERS
    emergency_action: str = "reject"  # reject = immediate 503; route = send to emergency_route
    emergency_route: str = ""  # SIP URI used when emergency_action = route
    advance_on_4xx: bool = True  # route-advance on 4xx other than those that must not advance
    # The serial fork's bounds: at most `max_contacts` of a redirect's Contacts are tried, and no
    # new attempt starts more than `fork_window` s after ClearIP was asked (its PASSporT would reach
    # the next carrier's verifier stale: RFC 8224 §6.2.2 checks `iat` against a 60 s freshness).
    max_contacts: int = 10
    fork_window: float = 40.0
    large_over_tcp: bool = False  # send requests over 1,300 bytes by TCP (RFC 3261 §18.1.1)
    max_in_flight: int = 2000  # INVITE server transactions; above it new INVITEs get 503 Retry-After
    # Overload control (core/overload.py): past this many seconds of queue delay (how long UDP
    # datagrams wait in the kernel before the proxy reads them) a share of new INVITEs get 503 with
    # Retry-After `overload_retry_after` s, so admitted calls keep the CPU. 0 = off.
    overload_queue_delay: float = 0.2
    overload_retry_after: int = 5
    drain_timeout: float = 30.0
    # Security.
    allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_message_size: int = 65535
    max_connections_per_source: int = 64
    idle_timeout: float = 300.0  # inbound TCP/TLS connection idle limit
    # Metrics and logs.
    metrics: str = "auto"
    metrics_interval: float = 60.0
    proxy_id: str = field(default_factory=socket.gethostname)
    log_numbers: bool = False  # may phone numbers appear in logs and traces
    log_level: str = "INFO"

    # ---- derived ---------------------------------------------------------------------------
    @property
    def clearip_uri(self) -> SipUri:
        return parse_uri(self.clearip)

    @property
    def link_wait(self) -> float:
        """How long a call waits for the ClearIP link to come up: ``clearip_connect_wait``, at most
        half of ``timeout`` (so it stays well under it whatever the two are set to)."""
        return min(self.clearip_connect_wait, self.timeout / 2)

    @property
    def allow_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(c, strict=False) for c in self.allow)


_LIST_FIELDS = {"udp", "tcp", "tls", "copy_headers", "emergency_numbers", "allow", "redirect_codes"}


def _parse_hostport(setting: str, value: str, default_port: int) -> HostPort:
    value = value.strip()
    if not value:
        raise SettingsError(setting, "empty address")
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    elif value.count(":") > 1:
        host, port_s = value, ""
    else:
        host, port_s = value, ""
    try:
        port = int(port_s) if port_s else default_port
    except ValueError:
        raise SettingsError(setting, f"bad port in {value!r}") from None
    if not 0 <= port <= 65535:
        raise SettingsError(setting, f"port out of range in {value!r}")
    if not host:
        host = "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise SettingsError(setting, f"{host!r} is not an IP address to bind") from None
        host = "127.0.0.1"
    return HostPort(host, port)


def _as_list(setting: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value]
    raise SettingsError(setting, f"expected a list, got {value!r}")


def _as_bool(setting: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise SettingsError(setting, f"expected true or false, got {value!r}")


def _as_number(setting: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise SettingsError(setting, f"expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise SettingsError(setting, f"expected a whole number, got {value!r}")
        if isinstance(value, str) and not re.fullmatch(r"[+-]?[0-9]+", value.strip()):
            raise SettingsError(setting, f"expected a whole number, got {value!r}")
    try:
        n = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise SettingsError(setting, f"expected a number, got {value!r}") from None
    if kind is float and not math.isfinite(n):
        raise SettingsError(setting, f"expected a finite number, got {value!r}")
    return n


def _coerce(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Turn raw values (TOML, env strings or flags) into the Settings fields' types."""
    known = {f.name: f for f in fields(Settings)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise SettingsError(key, "unknown setting")
        default = Settings.__dataclass_fields__[key].default
        if key in ("udp", "tcp", "tls"):
            port = 5061 if key == "tls" else 5060
            out[key] = tuple(_parse_hostport(key, v, port) for v in _as_list(key, value))
        elif key == "redirect_codes":
            out[key] = tuple(_as_number(key, v, int) for v in _as_list(key, value))
        elif key in _LIST_FIELDS:
            out[key] = tuple(_as_list(key, value))
        elif isinstance(default, bool):
            out[key] = _as_bool(key, value)
        elif isinstance(default, float):
            out[key] = float(_as_number(key, value, float))
        elif isinstance(default, int):
            out[key] = _as_number(key, value, int)
        else:
            out[key] = str(value)
    return out


def with_transport(uri: str, transport: str) -> str:
    """Set ``;transport=`` of a SIP URI; a standard port of the other transport follows (5061 <-> 5060).

    The one copy of this rule: the CDK settings, ``clearip-proxy set clearip_transport`` (the Session
    Manager document) and ``install.sh --clearip-transport`` (through ``clearip-proxy settings write``)
    all call it."""
    if transport not in CLEARIP_TRANSPORTS:
        raise SettingsError("clearip_transport", f"must be tls or tcp, got {transport!r}")
    base, sep, params = uri.partition(";")
    kept = [p for p in params.split(";") if p and not p.lower().startswith("transport=")] if sep else []
    other = "tcp" if transport == "tls" else "tls"
    m = re.match(r"^(sips?:(?:[^@]*@)?(?:\[[^\]]+\]|[^:]+)):(\d+)$", base)
    if m and int(m.group(2)) == TRANSPORT_PORTS[other]:
        base = f"{m.group(1)}:{TRANSPORT_PORTS[transport]}"
    return ";".join([base, *kept, f"transport={transport}"])


def trusted_cidr(setting: str, value: str) -> str:
    """Check one CIDR of trusted sources the way an operator means it; return it unchanged.

    A prefix is required (``203.0.113.10/32``, not ``203.0.113.10``), host bits must be clear, and
    ``0.0.0.0/0`` / ``::/0`` are refused. The one copy of this rule: the proxy's own ``allow``
    setting written by ``settings write`` (install.sh, the Session Manager documents) and the CDK
    settings (``sip_cidrs``, ``ssh_cidr``) call it."""
    value = value.strip()
    if "/" not in value:
        raise SettingsError(
            setting, f"{value!r} is a bare address; write it as a CIDR with a prefix, e.g. {value}/32"
        )
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        try:
            fixed = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise SettingsError(setting, f"{value!r} is not a CIDR ({exc})") from None
        raise SettingsError(setting, f"{value!r} has host bits set; did you mean {fixed}?") from None
    if net.prefixlen == 0:
        raise SettingsError(
            setting, f"{value} admits the whole internet; list only your trusted switches and carriers"
        )
    return value


def validate(s: Settings) -> Settings:
    """Check every setting; return the settings with the listener defaults applied."""
    for name in ("timeout", "ring_timeout", "keepalive_interval", "reconnect_max", "metrics_interval"):
        v = getattr(s, name)
        if not v > 0:
            raise SettingsError(name, f"must be greater than 0, got {v}")
    if s.metrics_interval > MAX_METRICS_INTERVAL:
        raise SettingsError(
            "metrics_interval",
            f"must be at most {MAX_METRICS_INTERVAL} seconds (the heartbeat alarm expects a datapoint "
            f"every minute), got {s.metrics_interval}",
        )
    if s.timeout > 60:
        raise SettingsError("timeout", "must be at most 60 seconds (a PASSporT is stale after 60 s)")
    if not 0 < s.clearip_connect_wait <= 2:
        raise SettingsError(
            "clearip_connect_wait",
            f"must be more than 0 and at most 2 seconds (calls wait that long), got {s.clearip_connect_wait}",
        )
    if not 1 <= s.max_contacts <= 100:
        raise SettingsError("max_contacts", f"must be 1 to 100, got {s.max_contacts}")
    if not 0 < s.fork_window <= 60:
        raise SettingsError(
            "fork_window",
            "must be more than 0 and at most 60 seconds (a PASSporT is stale after 60 s), "
            f"got {s.fork_window}",
        )
    if s.breaker_threshold < 0:
        raise SettingsError("breaker_threshold", "must not be negative (0 turns the breaker off)")
    for name in ("breaker_window", "breaker_cool_off"):
        v = getattr(s, name)
        if not v > 0:
            raise SettingsError(name, f"must be greater than 0, got {v}")
    if s.breaker_probe_every < 1:
        raise SettingsError("breaker_probe_every", "must be at least 1")
    if not 0 <= s.drain_timeout <= MAX_DRAIN_TIMEOUT:
        raise SettingsError(
            "drain_timeout",
            f"must be 0 to {MAX_DRAIN_TIMEOUT} seconds (systemd kills the proxy "
            f"{UNIT_TIMEOUT_STOP_SEC} s after SIGTERM), got {s.drain_timeout}",
        )
    if s.max_in_flight < 1:
        raise SettingsError("max_in_flight", "must be at least 1")
    if not (s.overload_queue_delay == 0 or 0.005 <= s.overload_queue_delay <= 0.4):
        raise SettingsError(
            "overload_queue_delay",
            "must be 0 (off) or between 0.005 and 0.4 seconds (SIP clients retransmit after 0.5 s), "
            f"got {s.overload_queue_delay}",
        )
    if not 1 <= s.overload_retry_after <= 3600:
        raise SettingsError(
            "overload_retry_after", f"must be 1 to 3600 seconds, got {s.overload_retry_after}"
        )
    if not 1500 <= s.max_message_size <= 1_048_576:
        raise SettingsError("max_message_size", "must be between 1500 and 1048576 bytes")
    try:
        uri = parse_uri(s.clearip)
    except UriError as exc:
        raise SettingsError("clearip", f"not a SIP URI: {exc}") from None
    transport = uri.params.get("transport", "tls" if uri.scheme == "sips" else "udp")
    if (transport or "").lower() not in ("tls", "tcp"):
        raise SettingsError("clearip", "transport must be tls or tcp (one persistent connection)")
    if s.clearip_ca and not Path(s.clearip_ca).is_file():
        raise SettingsError("clearip_ca", f"no such file: {s.clearip_ca}")
    for cidr in s.allow:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise SettingsError("allow", f"{cidr!r} is not a CIDR") from None
    for h in s.copy_headers:
        if not h or any(c in h for c in " :\t\r\n"):
            raise SettingsError("copy_headers", f"{h!r} is not a header name")
    if not s.redirect_codes:
        raise SettingsError("redirect_codes", "must name at least one of 300, 301, 302")
    for code in s.redirect_codes:
        if code not in FOLLOWABLE_REDIRECT_CODES:
            raise SettingsError(
                "redirect_codes",
                f"{code} cannot be followed; choose among {', '.join(map(str, FOLLOWABLE_REDIRECT_CODES))}",
            )
    for n in s.emergency_numbers:
        if not re.fullmatch(r"\+?[0-9]{1,15}", n):
            raise SettingsError("emergency_numbers", f"{n!r} is not a number")
    if s.emergency_action not in EMERGENCY_ACTIONS:
        raise SettingsError("emergency_action", f"must be one of {', '.join(EMERGENCY_ACTIONS)}")
    if s.emergency_action == "route":
        try:
            route = parse_uri(s.emergency_route)
        except UriError:
            raise SettingsError(
                "emergency_route", "a SIP URI is required when emergency_action = route"
            ) from None
        if route.headers or s.emergency_route.rstrip().endswith("?"):
            # It becomes the Request-URI, where RFC 3261 §19.1.1 allows no headers part.
            raise SettingsError("emergency_route", "must not carry URI headers ('?...')")
    if s.metrics not in METRICS_SINKS:
        raise SettingsError("metrics", f"must be one of {', '.join(METRICS_SINKS)}, got {s.metrics!r}")
    if s.advertise:
        try:
            ipaddress.ip_address(s.advertise)
        except ValueError:
            if not _HOSTNAME.fullmatch(s.advertise):
                raise SettingsError("advertise", f"{s.advertise!r} is not an address or host name") from None
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SettingsError("tls_cert" if not s.tls_cert else "tls_key", "tls_cert and tls_key go together")
    for name in ("tls_cert", "tls_key"):
        path = getattr(s, name)
        if path and not Path(path).is_file():
            raise SettingsError(name, f"no such file: {path}")
    if s.tls and not s.tls_cert:
        raise SettingsError("tls", "a TLS listener needs tls_cert and tls_key")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError("log_level", "must be DEBUG, INFO, WARNING or ERROR")
    if not (s.udp or s.tcp or s.tls):
        s = replace(
            s,
            udp=(HostPort("0.0.0.0", 5060),),
            tcp=(HostPort("0.0.0.0", 5060),),
            tls=(HostPort("0.0.0.0", 5061),) if s.tls_cert else (),
        )
    return s


def load(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from a TOML file, then ``CLEARIP_PROXY_*`` environment variables, then overrides."""
    raw: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise SettingsError("config", f"no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError("config", f"{path} is not valid TOML: {exc}") from None
        except OSError as exc:  # e.g. not readable by the proxy's user, or a directory
            raise SettingsError("config", f"cannot read {path}: {exc.strerror or exc}") from None
        raw.update(_coerce(data))
    env = os.environ if environ is None else environ
    env_raw = {
        k[len(ENV_PREFIX) :].lower(): v
        for k, v in env.items()
        if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() != "config"
    }
    raw.update(_coerce(env_raw))
    if overrides:
        raw.update(_coerce({k: v for k, v in overrides.items() if v is not None}))
    try:
        settings = Settings(**raw)
    except TypeError as exc:  # pragma: no cover - _coerce already names unknown keys
        raise SettingsError("config", str(exc)) from None
    return validate(settings)


def to_toml(s: Settings) -> str:
    """Render settings as the flat TOML the proxy reads (used by install.sh's helper and tests)."""
    lines = []
    for f in fields(Settings):
        v = getattr(s, f.name)
        if isinstance(v, tuple):
            items = ", ".join(str(x) if isinstance(x, int) else _toml_str(str(x)) for x in v)
            lines.append(f"{f.name} = [{items}]")
        elif isinstance(v, bool):
            lines.append(f"{f.name} = {'true' if v else 'false'}")
        elif isinstance(v, int | float):
            lines.append(f"{f.name} = {v}")
        else:
            lines.append(f"{f.name} = {_toml_str(str(v))}")
    return "\n".join(lines) + "\n"


def _toml_str(text: str) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML accepts)."""
    return json.dumps(text, ensure_ascii=False)
