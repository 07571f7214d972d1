"""Dashboard administrators: their names and password hashes.

Passwords are hashed with scrypt from the standard library (``hashlib.scrypt``,
RFC 7914), n=2**15, r=8, p=1 (OWASP's recommended minimum for scrypt: 32 MiB and
some 50-100 ms per hash here), a 16-byte random salt per hash, a 32-byte key. The
stored text names its parameters (``scrypt$n$r$p$salt$key``, base64), so stronger ones
later still check old hashes. argon2id would do as well, but needs a C extension
(argon2-cffi) on the relay for no gain a login page needs.

A hash costs tens of milliseconds of one core: ``verify`` runs in a thread, and a
name that has no user is checked against a dummy hash, so a reply's time does not
tell whether the name exists.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

SCRYPT_N: Final = 2**15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16
_KEY_BYTES: Final = 32
MIN_PASSWORD: Final = 10
MAX_PASSWORD: Final = 1024
"""Longer is refused before hashing: a megabyte password is a way to burn CPU."""
USER_NAME: Final = r"[a-z][a-z0-9_.-]{0,63}"
_USER_NAME = re.compile(USER_NAME)


class PasswordError(ValueError):
    """A name or password that cannot be used; the text says why."""


@dataclass(frozen=True, slots=True)
class ScryptParams:
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @property
    def maxmem(self) -> int:
        """scrypt needs 128 * r * n bytes; the default limit (32 MiB) is just too small."""
        return 2 * 128 * self.r * self.n


def check_user_name(name: str) -> str:
    if _USER_NAME.fullmatch(name) is None:
        raise PasswordError(f"user name must match {USER_NAME}")
    return name


def check_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise PasswordError(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, params: ScryptParams) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=params.n, r=params.r, p=params.p,
        maxmem=params.maxmem, dklen=_KEY_BYTES,
    )  # fmt: skip


def hash_password(password: str, params: ScryptParams = ScryptParams()) -> str:
    """``scrypt$n$r$p$salt$key`` for a password that ``check_password`` accepts."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(check_password(password), salt, params)
    return f"scrypt${params.n}${params.r}${params.p}${_b64(salt)}${_b64(key)}"


@functools.cache
def _dummy() -> str:
    """What a name without a user is checked against (made once, at its first use)."""
    return hash_password("x" * MIN_PASSWORD)


def verify_password(password: str, stored: str | None) -> bool:
    """Whether ``password`` is the one ``stored`` was made from (constant-time compare);
    ``stored`` None (no such user) costs the same and is False."""
    if len(password) > MAX_PASSWORD:
        return False
    try:
        scheme, n, r, p, salt, key = (stored or _dummy()).split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        params = ScryptParams(int(n), int(r), int(p))
        expected = _unb64(key)
        computed = _scrypt(password, _unb64(salt), params)
    except ValueError:  # a hash this code did not write: nobody logs in with it
        return False
    return hmac.compare_digest(computed, expected) and stored is not None


async def verify(password: str, stored: str | None) -> bool:
    """``verify_password`` off the event loop."""
    return await asyncio.to_thread(verify_password, password, stored)
