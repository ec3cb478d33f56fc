from __future__ import annotations

from pathlib import Path

from proxy_runtime.metrics import names
from proxy_runtime.metrics.doc import metrics_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"


def test_doc_holds_the_generated_table() -> None:
    text = DOC.read_text()
    assert metrics_table() in text, "regenerate: python -m proxy_runtime.metrics.doc"
    for spec in names.ALL_METRICS:
        assert f"| `{spec.name}` | {spec.unit.value} |" in text
    assert names.NAMESPACE in text and names.DIMENSION_PROXY_ID in text


def test_names_are_unique_and_valid() -> None:
    seen = [m.name for m in names.ALL_METRICS]
    assert len(seen) == len(set(seen))
    assert all(0 < len(n) <= 255 and n.isascii() for n in seen)
