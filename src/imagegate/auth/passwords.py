"""Password hashing with argon2id; checking an unknown user costs the same as a known one."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 8

_hasher = PasswordHasher()
# Verified against when the username does not exist, so that a wrong username and a wrong
# password take the same time and give the same answer.
_DECOY = _hasher.hash("imagegate-decoy-password")
# One argon2id check takes ~180 ms of CPU and 64 MiB. They run in a pool of their own, off the
# event loop, and only a few at once: a burst of logins can neither stall other requests nor
# take a thread (and 64 MiB) each from the default pool that file reads share.
_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="argon2")


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"Password too short: use at least {MIN_PASSWORD_LENGTH} characters.")
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when `password` matches; with no hash (unknown user) it still spends the time."""
    try:
        return _hasher.verify(password_hash or _DECOY, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


async def hash_password_async(password: str) -> str:
    """`hash_password` in the argon2 pool (off the event loop)."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, hash_password, password)


async def verify_password_async(password_hash: str | None, password: str) -> bool:
    """`verify_password` in the argon2 pool (off the event loop)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_POOL, verify_password, password_hash, password)
