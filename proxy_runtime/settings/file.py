"""Edit one key of the flat TOML settings file in place, validating the result first."""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from pathlib import Path

from proxy_runtime import settings as settings_mod
from proxy_runtime.settings import SettingsError
from proxy_runtime.sip.uri import SipUri, parse_uri

_LIST_KEYS = {"udp", "tcp", "tls", "allow", "copy_headers", "emergency_numbers", "redirect_codes"}


def _toml_value(key: str, value: str) -> str:
    default = settings_mod.Settings.__dataclass_fields__[key].default
    if key in _LIST_KEYS:
        items = [v.strip() for v in value.split(",") if v.strip()]
        if key == "redirect_codes":  # status codes as TOML numbers; anything else quoted (load() refuses it)
            codes = (v if re.fullmatch(r"[1-9][0-9]{0,2}", v) else json.dumps(v) for v in items)
            return "[" + ", ".join(codes) + "]"
        return "[" + ", ".join(json.dumps(v) for v in items) + "]"
    if isinstance(default, bool):
        return "true" if value.strip().lower() in ("1", "true", "yes", "on") else "false"
    if isinstance(default, int | float):
        return value.strip()
    return json.dumps(value)


def set_value(path: str | os.PathLike[str], key: str, value: str) -> None:
    """Set ``key`` to ``value``; ``clearip_transport`` rewrites the ClearIP URI's transport."""
    p = Path(path)
    text = p.read_text() if p.exists() else ""
    if key == "clearip_transport":
        if value not in ("tls", "tcp"):
            raise SettingsError("clearip_transport", "must be tls or tcp")
        current = tomllib.loads(text).get("clearip", settings_mod.DEFAULT_CLEARIP_URI) if text else None
        uri = parse_uri(current or settings_mod.DEFAULT_CLEARIP_URI)
        port = uri.port
        if port in (5060, 5061, None):
            port = 5061 if value == "tls" else 5060
        params = {k: v for k, v in uri.params.items() if k != "transport"}
        params["transport"] = value
        new = SipUri("sip", uri.user, None, uri.host, port, params, "")
        key, value = "clearip", str(new)
    if key not in settings_mod.Settings.__dataclass_fields__:
        raise SettingsError(key, "unknown setting")
    line = f"{key} = {_toml_value(key, value)}"
    pattern = re.compile(rf"^{re.escape(key)}\s*=.*$", re.MULTILINE)
    new_text = (
        pattern.sub(line, text, count=1)
        if pattern.search(text)
        else text + ("" if text.endswith("\n") or not text else "\n") + line + "\n"
    )
    # Validate the whole file as the proxy would read it before replacing it.
    with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=p.parent, delete=False) as tmp:
        tmp.write(new_text)
    try:
        settings_mod.load(tmp.name, environ={})
        os.replace(tmp.name, p)
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
