"""Markdown files that several benchmarks write a section of each."""

from __future__ import annotations

from pathlib import Path

from fedseg.files import write_text_atomic


def write_section(path: Path, name: str, text: str, title: str) -> None:
    """Replaces (or appends) the section ``name`` of ``path``, creating it with ``title``."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    content = path.read_text() if path.is_file() else f"# {title}\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in content:
        head, rest = content.split(begin, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(path, content)
