"""Users: username + argon2 password hash; a disabled user's keys and tokens stop working, and
its tokens stay dead when it is enabled again (`token_version`)."""

from __future__ import annotations

import re

from sqlalchemy import func, or_, select, update

from imagegate.auth.passwords import hash_password_async
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
        password_hash=await hash_password_async(password),
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
    """Disable (its tokens die for good: enabling it again does not revive them) or enable."""
    user = await find_user(session, username=username)
    if user is not None:
        user.disabled_at = utcnow() if disabled else None
        if disabled:
            await revoke_tokens(session, user)
    return user


async def set_password(session: AsyncSession, *, username: str, password: str) -> User | None:
    """A new password; every token issued before it stops working."""
    user = await find_user(session, username=username)
    if user is not None:
        user.password_hash = await hash_password_async(password)
        await revoke_tokens(session, user)
    return user


async def revoke_tokens(session: AsyncSession, user: User) -> None:
    """Every getToken token of the user issued so far stops working (in SQL, so two
    concurrent revocations both count)."""
    await session.execute(
        update(User).where(User.id == user.id).values(token_version=User.token_version + 1)
    )
    await session.refresh(user, ["token_version"])


async def admins_left(
    session: AsyncSession, *, without_key: int | None = None, without_user: int | None = None
) -> int:
    """Active admin keys and admin users, leaving out one key and one user (and its keys).

    Takes the admin rows' locks first (the database's write lock on SQLite), so two admins
    removing each other at once cannot both see the other one still there."""
    await session.execute(update(ApiKey).where(ApiKey.is_admin).values(is_admin=True))
    await session.execute(update(User).where(User.is_admin).values(is_admin=True))
    now = utcnow()
    keys = (
        select(func.count())
        .select_from(ApiKey)
        .outerjoin(User, User.id == ApiKey.user_id)
        .where(
            ApiKey.is_admin,
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
            User.disabled_at.is_(None),
            ApiKey.id != (without_key or 0),
            or_(ApiKey.user_id.is_(None), ApiKey.user_id != (without_user or 0)),
        )
    )
    users = (
        select(func.count())
        .select_from(User)
        .where(User.is_admin, User.disabled_at.is_(None), User.id != (without_user or 0))
    )
    return int(await session.scalar(keys) or 0) + int(await session.scalar(users) or 0)


async def key_ids_of(session: AsyncSession, user_id: int) -> list[int]:
    return list(await session.scalars(select(ApiKey.id).where(ApiKey.user_id == user_id)))
