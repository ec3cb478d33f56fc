"""STIR/SHAKEN outcomes read from ClearIP's answer: attestation, verification status, blocks.

Pure functions on header values (no I/O, no clock). The proxy never verifies a PASSporT: ClearIP
signed or verified it; the proxy only reads what it says, to count it.

* ``Identity`` (RFC 8224 §4): ``<JWS>;info=<URL>;alg=ES256;ppt=shaken``. The JWS is in compact
  serialisation (RFC 7515 §7.1, ``header.payload.signature``, each part base64url without padding).
  The SHAKEN PASSporT's payload carries ``attest`` (ATIS-1000074: ``A``, ``B`` or ``C``); a
  diverted call carries one more PASSporT per diversion with ``ppt=div`` (RFC 8946). The PASSporT
  type comes from the JWS protected header's ``ppt`` (RFC 8225 §8.1), or from the header field's
  ``ppt`` parameter (bare or quoted) when the JWS header cannot be read.
* ``P-Asserted-Identity`` (RFC 3325) of a verified call: ``verstat`` (3GPP TS 24.229 §7.2A.20),
  a tel-URI parameter that carriers put in the SIP URI's user part
  (``<sip:+12025550100;verstat=TN-Validation-Passed@host;user=phone>``), in a tel URI's parameters,
  or (seen in the field) as a header parameter after the ``>``.
* Blocks: ClearIP's (or a carrier's) final answer to the caller: ``603 Decline``, ``603 Network
  Blocked`` ("603+", ATIS-1000099 with ``Reason``/``Call-Info``), ``607 Unwanted`` and ``608
  Rejected`` (RFC 8688).

Why by hand: a JWT library (PyJWT, python-jose) verifies by default and insists on a key or on
disabling verification claim by claim; reading one claim of an unverified token is a base64url
decode and a ``json.loads``, both in the standard library.

Cost: a few microseconds per call (``python -m bench.stir_micro``); every decode error is caught
per value and counted as undecodable, so nothing here can fail a call.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from enum import Enum


class Attestation(str, Enum):  # noqa: UP042 - as names.Unit
    """SHAKEN attestation levels (ATIS-1000074 §5.2.3)."""

    FULL = "A"
    PARTIAL = "B"
    GATEWAY = "C"


class Verstat(str, Enum):  # noqa: UP042 - as names.Unit
    """The verification result classes counted (3GPP TS 24.229 §7.2A.20 values, plus "other")."""

    PASSED = "TN-Validation-Passed"
    FAILED = "TN-Validation-Failed"
    NO_VALIDATION = "No-TN-Validation"
    OTHER = "other"


class Block(str, Enum):  # noqa: UP042 - as names.Unit
    """Final answers that block a call (the switch must not route-advance on them)."""

    DECLINE_603 = "603"
    NETWORK_BLOCKED_603 = "603+"
    UNWANTED_607 = "607"
    REJECTED_608 = "608"


@dataclass(frozen=True, slots=True)
class StirOutcome:
    """What one call's headers said. ``verstat_raw`` is the value as sent (bounded in length)."""

    attestation: Attestation | None = None
    shaken: int = 0  # SHAKEN PASSporTs read
    div: int = 0  # diversion PASSporTs (ppt=div) read
    undecodable: int = 0  # Identity values that could not be read (or lacked a valid attest)
    verstat: Verstat | None = None
    verstat_raw: str = ""


NOTHING = StirOutcome()

_MAX_VALUE = 16_384  # an Identity longer than this is not a PASSporT we will decode
_MAX_VERSTAT = 64
_VERSTAT = re.compile(r"(?i)(?:^|[;?&])\s*verstat\s*=\s*([^;>?&,\s\"@]*)")
_PPT_PARAM = re.compile(r"(?i)(?:^|;)\s*ppt\s*=\s*\"?([A-Za-z0-9_-]+)")
_VERSTATS = {v.value.lower(): v for v in Verstat if v is not Verstat.OTHER}
_ATTESTATIONS = {a.value: a for a in Attestation}


def _b64url_json(part: str) -> object:
    """Decode one base64url (no padding) JWS part to JSON; raises ValueError when it is not."""
    if not part:
        raise ValueError("empty JWS part")
    raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    return json.loads(raw)


def _split_values(values: tuple[str, ...] | list[str]) -> list[str]:
    """Header lines to single values: a line may join several with commas (outside <> and quotes)."""
    out: list[str] = []
    for line in values:
        if "," not in line:
            out.append(line.strip())
            continue
        depth = 0
        quoted = False
        start = 0
        for i, c in enumerate(line):
            if c == '"':
                quoted = not quoted
            elif quoted:
                continue
            elif c == "<":
                depth += 1
            elif c == ">":
                depth = max(0, depth - 1)
            elif c == "," and depth == 0:
                out.append(line[start:i].strip())
                start = i + 1
        out.append(line[start:].strip())
    return [v for v in out if v]


def read_passport(value: str) -> tuple[str | None, Attestation | None]:
    """``(ppt, attest)`` of one Identity value; raises ValueError (or a subclass) when unreadable.

    ``ppt`` is ``"shaken"`` when neither the JWS header nor the parameter names a type (RFC 8225
    §8.1: a PASSporT without ``ppt`` is a base PASSporT; SHAKEN services always send ``shaken``, and
    counting it by its ``attest`` is what the operator wants). ``attest`` is None for non-SHAKEN.
    """
    if len(value) > _MAX_VALUE:
        raise ValueError("Identity value too long")
    token, _, params = value.partition(";")
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS")
    header, payload, _signature = parts
    # RFC 8224 §4 requires the ppt parameter for every typed PASSporT and that it match the JWS
    # header's; read it there (a string search), and decode the JWS header only when it is absent.
    m = _PPT_PARAM.search(params) if params else None
    ppt: str | None = m.group(1).lower() if m else None
    if ppt is None:
        try:
            protected = _b64url_json(header)
            if isinstance(protected, dict) and isinstance(protected.get("ppt"), str):
                ppt = protected["ppt"].lower()
        except (ValueError, binascii.Error, UnicodeDecodeError):
            ppt = None
    if ppt is None:
        ppt = "shaken"
    if ppt != "shaken":
        return ppt, None
    claims = _b64url_json(payload)  # empty (RFC 8225 §7 compact form) -> ValueError: unreadable
    if not isinstance(claims, dict):
        raise ValueError("PASSporT payload is not a JSON object")
    attest = _ATTESTATIONS.get(str(claims.get("attest", "")).strip().upper())
    if attest is None:
        raise ValueError("SHAKEN PASSporT without a valid attest claim")
    return ppt, attest


def read_identity(values: tuple[str, ...] | list[str]) -> tuple[Attestation | None, int, int, int]:
    """``(attestation, shaken, div, undecodable)`` over a call's Identity values.

    The attestation is the first SHAKEN PASSporT's (a call has one; a second would be an error of
    the signer, counted but not reported twice)."""
    attestation: Attestation | None = None
    shaken = div = bad = 0
    for value in _split_values(values):
        try:
            ppt, attest = read_passport(value)
        except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
            bad += 1
            continue
        if ppt == "div":
            div += 1
        elif attest is not None:
            shaken += 1
            if attestation is None:
                attestation = attest
        # other PASSporT types (rph, ...) are neither counted nor undecodable
    return attestation, shaken, div, bad


def _strip_display(value: str) -> str:
    """The value without its display name (a quoted name may hold anything, even "verstat=")."""
    value = value.lstrip()
    if value.startswith('"'):
        i = 1
        while i < len(value):
            c = value[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                return value[i + 1 :]
            i += 1
        return ""
    return value


def read_verstat(values: tuple[str, ...] | list[str]) -> tuple[Verstat | None, str]:
    """``(class, raw value)`` of the first ``verstat`` in the P-Asserted-Identity values."""
    for value in _split_values(values):
        m = _VERSTAT.search(_strip_display(value))
        if m is None:
            continue
        raw = m.group(1)[:_MAX_VERSTAT]
        return _VERSTATS.get(raw.lower(), Verstat.OTHER), raw
    return None, ""


def read_stir(identity: tuple[str, ...] | list[str], pai: tuple[str, ...] | list[str]) -> StirOutcome:
    """The STIR/SHAKEN outcome of one call. Never raises on any header content."""
    if not identity and not pai:
        return NOTHING
    attestation, shaken, div, bad = read_identity(identity) if identity else (None, 0, 0, 0)
    verstat, raw = read_verstat(pai) if pai else (None, "")
    return StirOutcome(attestation, shaken, div, bad, verstat, raw)


def blocked(status: int, reason: str) -> Block | None:
    """The block class of a final answer, or None. ``603 Network Blocked`` is 603+."""
    if status == 603:
        return Block.NETWORK_BLOCKED_603 if reason.strip().lower() == "network blocked" else Block.DECLINE_603
    if status == 607:
        return Block.UNWANTED_607
    if status == 608:
        return Block.REJECTED_608
    return None
