"""
Broker passwords encrypted at rest.

Passwords are stored in C{mqtt_connection.password} as C{fernet:<token>}
(Fernet: AES-128-CBC with HMAC-SHA256, from C{cryptography}) under a key
read from a key file.  mqttsvc decrypts them only to connect; they never
appear in a result, a log line, an event or a metric.
"""

from __future__ import annotations

import os
import stat

from cryptography.fernet import Fernet, InvalidToken

from mqttsvc.config import ConfigError

PREFIX = "fernet:"
_FIELD = "secret-key-file"


class SecretError(Exception):
    """
    A stored secret cannot be decrypted with the key at hand.
    """


class Secrets:
    """
    Encrypts and decrypts stored secrets with one key.
    """

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def __repr__(self) -> str:
        return "<Secrets (key hidden)>"

    @staticmethod
    def generate_key() -> bytes:
        return Fernet.generate_key()

    def encrypt(self, plaintext: str) -> str:
        return PREFIX + self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, stored: str) -> str:
        """
        The plaintext of a stored value (a value without the prefix was
        written in plain text by someone else, and is returned as is).

        @raise SecretError: when the key does not fit.
        """
        if not is_encrypted(stored):
            return stored
        try:
            return self._fernet.decrypt(stored[len(PREFIX) :].encode()).decode()
        except (InvalidToken, ValueError):
            raise SecretError("the secret key does not decrypt this value") from None


def is_encrypted(stored: str) -> bool:
    return stored.startswith(PREFIX)


def load_key(path: str) -> Secrets:
    """
    Read a key file (a Fernet key: 32 bytes, URL-safe base64).

    @raise ConfigError: naming C{secret-key-file} when it is missing,
        readable by others, or not a key.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            key = f.read().strip()
    except OSError as e:
        raise ConfigError(_FIELD, f"cannot read {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(_FIELD, f"{path} is accessible to other users; run: chmod 600 {path}")
    try:
        return Secrets(key)
    except ValueError:
        raise ConfigError(
            _FIELD,
            f"{path} does not hold a key; make one with: mqttsvc generate-key > {path}",
        ) from None
