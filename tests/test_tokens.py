"""
The token file: format, permissions, and caller lookup.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mqttsvc.config import ConfigError
from mqttsvc.control.tokens import load_tokens

BACKEND = "b" * 32
OPS = "o" * 32


def write(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_names_by_token(tmp_path: Path) -> None:
    """Each token maps to its caller's name; comments and blank lines are ignored."""
    tokens = load_tokens(write(tmp_path / "t", f"# callers\nbackend {BACKEND}\n\nops {OPS}\n"))
    assert tokens.caller(BACKEND.encode()) == "backend"
    assert tokens.caller(OPS.encode()) == "ops"
    assert tokens.caller(b"x" * 32) is None
    assert tokens.caller(b"") is None
    assert tokens.first() == BACKEND
    assert BACKEND not in repr(tokens)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no 'NAME TOKEN' line"),
        ("backend\n", "line 1: expected 'NAME TOKEN'"),
        ("backend short\n", "shorter than 16"),
        (f"a {BACKEND}\nb {BACKEND}\n", "line 2: the token of b is a duplicate"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    """A malformed file is refused with the line and the problem."""
    with pytest.raises(ConfigError, match=message):
        load_tokens(write(tmp_path / "t", text))


def test_world_readable_file_refused(tmp_path: Path) -> None:
    """Tokens readable by every user are refused, with the fix."""
    with pytest.raises(ConfigError, match="chmod o-rwx"):
        load_tokens(write(tmp_path / "t", f"backend {BACKEND}\n", 0o644))


def test_missing_file(tmp_path: Path) -> None:
    """An unreadable file is named in the error."""
    with pytest.raises(ConfigError, match=r"cannot read .*/nope"):
        load_tokens(str(tmp_path / "nope"))
