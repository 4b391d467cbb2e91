"""Users: username + argon2 password hash; a disabled user's keys and tokens stop working."""

from __future__ import annotations

import re

from sqlalchemy import select

from imagegate.auth.passwords import hash_password
from imagegate.store.db import AsyncSession
from imagegate.store.models import ApiKey, User, utcnow

USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


class UserExists(ValueError):
    pass


def check_username(username: str) -> str:
    if not USERNAME.match(username):
        raise ValueError(
            f"Invalid username {username!r}: use 1-100 letters, digits and . _ @ -, "
            "starting with a letter or digit."
        )
    return username


async def create_user(
    session: AsyncSession, *, username: str, password: str, is_admin: bool = False
) -> User:
    check_username(username)
    if await find_user(session, username=username) is not None:
        raise UserExists(f"User {username!r} already exists: choose another username.")
    user = User(
        username=username,
        password_hash=hash_password(password),
        is_admin=is_admin,
        created_at=utcnow(),
    )
    session.add(user)
    await session.flush()
    return user


async def find_user(session: AsyncSession, *, username: str) -> User | None:
    return await session.scalar(select(User).where(User.username == username))


async def active_user(session: AsyncSession, user_id: int) -> User | None:
    user = await session.get(User, user_id)
    return user if user is not None and user.disabled_at is None else None


async def list_users(session: AsyncSession) -> list[User]:
    return list(await session.scalars(select(User).order_by(User.id)))


async def set_disabled(session: AsyncSession, *, username: str, disabled: bool) -> User | None:
    user = await find_user(session, username=username)
    if user is not None:
        user.disabled_at = utcnow() if disabled else None
    return user


async def key_ids_of(session: AsyncSession, user_id: int) -> list[int]:
    return list(await session.scalars(select(ApiKey.id).where(ApiKey.user_id == user_id)))
