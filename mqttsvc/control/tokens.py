"""
Bearer tokens for the control plane, read from a token file.

The file holds one C{NAME TOKEN} pair per line; the name says who calls
(C{backend}, C{ops}, ...) and is logged with every control action.  Blank
lines and lines starting with C{#} are ignored.
"""

from __future__ import annotations

import hmac
import os
import stat

import attrs

from mqttsvc.config import ConfigError

_FIELD = "rpc-token-file"


@attrs.frozen
class Tokens:
    """
    The callers that may use the control plane, by token.
    """

    names_by_token: dict[bytes, str] = attrs.field(repr=False)

    @property
    def names(self) -> list[str]:
        return sorted(self.names_by_token.values())

    def first(self) -> str:
        """
        The token of the file's first line (what the command line uses).
        """
        return next(iter(self.names_by_token)).decode()

    def caller(self, presented: bytes) -> str | None:
        """
        The name of the caller a token belongs to, or None.

        Every known token is compared, each in constant time, so the time
        taken says nothing about which token came close.
        """
        found = None
        for token, name in self.names_by_token.items():
            if hmac.compare_digest(token, presented):
                found = name
        return found


def load_tokens(path: str, check_permissions: bool = True) -> Tokens:
    """
    Read a token file.

    @raise ConfigError: when the file cannot be read, is readable by every
        user, or a line is malformed.
    """
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read()
    except OSError as e:
        raise ConfigError(_FIELD, f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(_FIELD, f"{path} is not UTF-8 text") from None
    if check_permissions and mode & stat.S_IROTH:
        raise ConfigError(_FIELD, f"{path} is readable by every user; run: chmod o-rwx {path}")
    tokens: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(_FIELD, f"{path} line {number}: expected 'NAME TOKEN'")
        name, token = parts
        if len(token) < 16:
            raise ConfigError(
                _FIELD, f"{path} line {number}: the token of {name} is shorter than 16 characters"
            )
        if token.encode() in tokens:
            raise ConfigError(_FIELD, f"{path} line {number}: the token of {name} is a duplicate")
        tokens[token.encode()] = name
    if not tokens:
        raise ConfigError(_FIELD, f"{path} has no 'NAME TOKEN' line")
    return Tokens(tokens)
