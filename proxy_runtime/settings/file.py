"""The settings file on a host: edit one key (``clearip-proxy set``) or write it whole from a site
settings file and flags (``clearip-proxy settings write``), validating with the proxy's own rules
before anything is replaced.

``write_settings`` is what deploy/install.sh runs at first boot and at every later deploy (the stack's
Session Manager association runs install.sh of the new release), so the rules that decide what a
setting may be, and whether a change is applied by a reload or needs a drained restart, live here
once, in Python, and not in the shell scripts.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from proxy_runtime import settings as settings_mod
from proxy_runtime.settings import (
    HOST_FIELDS,
    RESTART_ONLY_FIELDS,
    HostPort,
    Settings,
    SettingsError,
    trusted_cidr,
    with_transport,
)

_LIST_KEYS = {"udp", "tcp", "tls", "allow", "copy_headers", "emergency_numbers", "redirect_codes"}
Apply = Literal["unchanged", "reload", "restart"]
HEADER = (
    "# /etc/clearip-proxy/settings.toml, written by `clearip-proxy settings write` (install.sh, the\n"
    "# stack's release association). Keys are the proxy's Settings fields. On AWS the site's settings\n"
    "# come from the deployment's settings file, applied by a `cdk deploy` that changes them or the\n"
    "# release (or `aws ssm start-associations-once`): change them there.\n"
)


def _toml_value(key: str, value: str) -> str:
    default = Settings.__dataclass_fields__[key].default
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
        current = tomllib.loads(text).get("clearip") if text else None
        key, value = "clearip", with_transport(current or settings_mod.DEFAULT_CLEARIP_URI, value)
    if key not in Settings.__dataclass_fields__:
        raise SettingsError(key, "unknown setting")
    if key == "allow":
        for cidr in value.split(","):
            if cidr.strip():
                trusted_cidr("allow", cidr)
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
        _replace(tmp.name, p)
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)


SETTINGS_FILE_MODE = 0o640
"""A new settings file's mode: the proxy's group reads it (install.sh makes it root:clearip-proxy)."""


def _replace(tmp: str, target: Path) -> None:
    """Rename ``tmp`` over ``target``, giving it the mode, owner and group ``target`` had (a new file:
    :data:`SETTINGS_FILE_MODE`). A temporary file is 0600 and owned by whoever wrote it (root, for
    the Session Manager documents), which the proxy, running as its own user, could not read."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        os.chmod(tmp, SETTINGS_FILE_MODE)
    else:
        mine = os.stat(tmp)
        if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
            os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
    os.replace(tmp, target)


def _read_toml(path: Path, setting: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(setting, f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(setting, f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(setting, f"cannot read {path}: {exc.strerror or exc}") from None


def _render(key: str, value: Any) -> str:
    if isinstance(value, tuple):
        items = (str(v) if isinstance(v, int) else json.dumps(str(v)) for v in value)
        return f"{key} = [{', '.join(items)}]"
    if isinstance(value, bool):
        return f"{key} = {'true' if value else 'false'}"
    if isinstance(value, int | float):
        return f"{key} = {value!r}"
    return f"{key} = {json.dumps(str(value))}"


def _under(root: Path | None, path: str) -> str:
    return str(root / path.lstrip("/")) if root is not None and path else path


def write_settings(
    config: str | os.PathLike[str],
    *,
    site: str | os.PathLike[str] | None = None,
    values: Mapping[str, Any] | None = None,
    clearip_transport: str | None = None,
    root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
    dry_run: bool = False,
) -> tuple[Apply, list[str]]:
    """Write the host's settings file whole and say how the running proxy takes the change.

    The new file is: the host's own fields (:data:`HOST_FIELDS`) kept from the current file, then
    every key of ``site`` (a flat TOML of site-wide settings, which may not name a host field), then
    ``values`` (install.sh's flags). ``clearip_transport`` then rewrites the ClearIP URI's transport.
    Every ``allow`` entry must be a trusted CIDR (:func:`trusted_cidr`). The result is validated as
    the proxy loads it (file paths looked up under ``root``; not at all with ``check_files=False``,
    for a check before install.sh has made the certificate) before the file is replaced.

    Returns ``("unchanged" | "reload" | "restart", changed field names)``: ``restart`` when there
    was no file or a field of :data:`RESTART_ONLY_FIELDS` changed, ``reload`` when only fields the
    proxy re-reads on SIGHUP changed."""
    root_path = Path(root) if root else None
    target = Path(_under(root_path, os.fspath(config)))
    current_raw = _read_toml(target, "config") if target.exists() else {}
    current = settings_mod._coerce(current_raw)
    raw: dict[str, Any] = {k: current_raw[k] for k in HOST_FIELDS if k in current_raw}
    if site is not None:
        site_raw = _read_toml(Path(site), "site")
        for key in site_raw:
            if key in HOST_FIELDS:
                raise SettingsError(key, "belongs to one host and cannot be a site setting")
        raw.update(site_raw)
    raw.update({k: v for k, v in (values or {}).items() if v is not None})
    if clearip_transport is not None:
        raw["clearip"] = with_transport(
            str(raw.get("clearip", settings_mod.DEFAULT_CLEARIP_URI)), clearip_transport
        )
    new = settings_mod._coerce(raw)
    for cidr in new.get("allow", ()):
        trusted_cidr("allow", cidr)
    check = dict(new)
    for name in ("tls_cert", "tls_key", "clearip_ca"):
        if name in check:
            check[name] = _under(root_path, check[name]) if check_files else ""
    if not check_files:
        check.pop("tls", None)
    settings_mod.validate(Settings(**check))

    text = HEADER + "".join(_render(k, new[k]) + "\n" for k in _ordered(new))
    changed = _changed(current, new) if current_raw else sorted(new)
    apply: Apply
    if not current_raw or any(name in RESTART_ONLY_FIELDS for name in changed):
        apply = "restart"
    else:
        apply = "reload" if changed else "unchanged"
    if not dry_run and (not target.exists() or target.read_text() != text):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, prefix=".settings.") as tmp:
            tmp.write(text)
        try:
            _replace(tmp.name, target)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)
    return apply, changed


def read_value(
    config: str | os.PathLike[str], key: str, *, root: str | os.PathLike[str] | None = None
) -> Any:
    """One field of the settings file, coerced as the proxy reads it (absent: the field's default)."""
    if key not in Settings.__dataclass_fields__:
        raise SettingsError(key, "unknown setting")
    path = Path(_under(Path(root) if root else None, os.fspath(config)))
    values = settings_mod._coerce(_read_toml(path, "config"))
    return values.get(key, getattr(Settings(proxy_id=""), key))


def site_settings_toml(values: Mapping[str, Any]) -> str:
    """A site settings file (no host fields) for ``settings write --site``, validated as the proxy
    would load it (the CDK app renders the stack's with this at synth)."""
    for key in values:
        if key in HOST_FIELDS:
            raise SettingsError(key, "belongs to one host and cannot be a site setting")
    coerced = settings_mod._coerce(values)
    for cidr in coerced.get("allow", ()):
        trusted_cidr("allow", cidr)
    check = {k: v for k, v in coerced.items() if k not in ("tls", "clearip_ca")}
    settings_mod.validate(Settings(**check))
    return "".join(_render(k, coerced[k]) + "\n" for k in _ordered(coerced))


def _ordered(values: Mapping[str, Any]) -> Iterable[str]:
    """Keys in the order of the Settings fields, so the file reads the same every time."""
    return [f.name for f in fields(Settings) if f.name in values]


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Fields whose effective value differs (an absent key is the field's default)."""
    defaults = Settings(proxy_id="")
    out = []
    for f in fields(Settings):
        a = old.get(f.name, getattr(defaults, f.name))
        b = new.get(f.name, getattr(defaults, f.name))
        if _norm(a) != _norm(b):
            out.append(f.name)
    return out


def _norm(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(str(v) if isinstance(v, HostPort) else v for v in value)
    return value
