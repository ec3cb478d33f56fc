"""Test data kept in the repository, and loaders that fail loudly when it is missing.

A data-driven test must never pass or skip because its data is absent (an empty parametrization
or an empty glob passes vacuously): every loader here raises instead, so the module that uses it
fails at collection with a message naming the missing path.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent
RFC4475 = DATA / "rfc4475"
# RFC 4475 Appendix A: 49 messages plus the archive's test.dat (see rfc4475/README.md).
RFC4475_COUNT = 50


class MissingTestData(RuntimeError):
    """Raised at import/collection time when the repository's test data is not there."""


def rfc4475_files() -> list[Path]:
    """The 50 RFC 4475 message files, sorted by name; raises when any are missing."""
    files = sorted(RFC4475.glob("*.dat"))
    if len(files) != RFC4475_COUNT:
        raise MissingTestData(
            f"expected {RFC4475_COUNT} RFC 4475 messages in {RFC4475}, found {len(files)}: "
            "the repository's test data is incomplete (restore tests/data/rfc4475/)"
        )
    return files


def rfc4475_message(name: str) -> bytes:
    """One RFC 4475 message by its RFC name (e.g. ``wsinv``), byte for byte."""
    path = RFC4475 / f"{name}.dat"
    if not path.is_file():
        raise MissingTestData(f"RFC 4475 message {name!r} is missing: {path}")
    return path.read_bytes()
