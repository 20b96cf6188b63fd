"""
Fixtures of the reliability scenarios, and the report of their counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "build" / "reliability.json"


@pytest.fixture(scope="session")
def report() -> Iterator[dict[str, dict[str, Any]]]:
    """
    Each scenario records what was injected and counted; the whole is
    written to build/reliability.json for docs/reliability.md.
    """
    results: dict[str, dict[str, Any]] = {}
    yield results
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
