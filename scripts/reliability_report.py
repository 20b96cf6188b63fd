"""
Render build/reliability.json (written by `pytest tests/reliability`) into
the results table of docs/reliability.md, between its markers.

    python scripts/reliability_report.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "build" / "reliability.json"
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

COLUMNS = ("published", "committed", "duplicates", "dead_lettered")


def table(results: dict[str, dict[str, object]]) -> str:
    lines = [
        "| scenario | injected | load | published | committed | duplicates | dead-lettered "
        "| other measurements |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        others = {k: v for k, v in result.items() if k not in (*COLUMNS, "injected", "load")}
        lines.append(
            f"| {name} | {result.get('injected', '')} | {result.get('load', '')} | "
            + " | ".join(str(result.get(c, "")) for c in COLUMNS)
            + " | "
            + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in others.items())
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    results = json.loads(RESULTS.read_text())
    doc = DOC.read_text()
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{table(results)}\n{END}{tail}")


if __name__ == "__main__":
    main()
