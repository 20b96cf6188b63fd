"""
The README tells a new user what they need (issue 15, item 15): every
command of the command line is in its table, and "Running it" creates the
database before migrating it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mqttsvc.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def test_every_cli_command_is_in_the_readme_table() -> None:
    """generate-key and rotate-key were missing; a new command must be added there too."""
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    table = set(re.findall(r"^\| `([a-z-]+)", README, re.MULTILINE))
    assert set(commands.choices) <= table, sorted(set(commands.choices) - table)


def test_running_it_creates_the_database_before_migrating() -> None:
    """The first command of "Running it" creates the database that migrate then fills."""
    block = section("Running it").split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines[0].startswith("createdb ") and lines[0].split("#")[0].split()[-1] == "mqttsvc"
    assert lines[1].startswith("mqttsvc migrate ") and "dbname=mqttsvc" in lines[1]
