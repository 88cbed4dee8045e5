"""Tables for people and for tools: aligned text for the console, CSV and JSON files beside it."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from hat.fileio import atomic_write


def format_table(rows: Sequence[Sequence[Any]]) -> str:
    """Rows (the first is the header) as left-aligned columns, two spaces apart."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(max(map(len, cells), default=0))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def write_table(stem: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[Path]:
    """`stem`.csv and `stem`.json (a list of {column: value}); numbers stay numbers, inf/nan as strings in JSON."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    records = [{k: _json_value(v) for k, v in zip(header, row)} for row in rows]
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".json")]
    atomic_write(paths[0], lambda f: f.write(text.getvalue().encode()))
    atomic_write(paths[1], lambda f: f.write(json.dumps(records, indent=1).encode()))
    return paths


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value
