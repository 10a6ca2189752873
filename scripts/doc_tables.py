"""Generated tables in the docs: the text between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` markers, replaced by the benchmark scripts that measure it."""

from __future__ import annotations

from pathlib import Path


def replace_between(doc: Path, marker: str, text: str) -> bool:
    """Puts ``text`` between the ``marker`` pair of ``doc``; False when either is missing."""
    if not doc.exists():
        return False
    start, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    content = doc.read_text()
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    doc.write_text(head + start + "\n" + text + end + rest.split(end, 1)[1])
    return True
