"""The RFC 4475 messages in tests/data/rfc4475/ are the RFC's own, byte for byte: each file's
sha256 matches the one recorded in that directory's README, and nothing is missing or extra."""

from __future__ import annotations

import hashlib
import re

from tests.data import RFC4475, RFC4475_COUNT, rfc4475_files

ROW = re.compile(r"^\| `(?P<name>[a-z0-9]+\.dat)` \| (?P<size>\d+) \| `(?P<sha>[0-9a-f]{64})` \|$", re.M)


def recorded() -> dict[str, tuple[int, str]]:
    text = (RFC4475 / "README.md").read_text()
    return {m["name"]: (int(m["size"]), m["sha"]) for m in ROW.finditer(text)}


def test_every_message_matches_its_recorded_checksum() -> None:
    table = recorded()
    assert len(table) == RFC4475_COUNT
    files = {p.name: p.read_bytes() for p in rfc4475_files()}
    assert set(files) == set(table)
    for name, data in files.items():
        assert (len(data), hashlib.sha256(data).hexdigest()) == table[name], name


def test_line_ends_were_not_converted() -> None:
    # wsinv is CRLF throughout; a checkout that converted line ends would leave bare LFs.
    data = (RFC4475 / "wsinv.dat").read_bytes()
    assert b"\r\n" in data
    assert data.count(b"\n") == data.count(b"\r\n")
