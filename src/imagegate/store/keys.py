"""API keys: `sk-...` secrets shown once, stored as sha256 digests."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC

from sqlalchemy import func, select

from imagegate.store.db import AsyncSession
from imagegate.store.models import ApiKey, User, utcnow

KEY_PREFIX = "sk-"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_key(
    session: AsyncSession,
    *,
    name: str,
    is_admin: bool = False,
    allowed_models: list[str] | None = None,
    user_id: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the secret, which is never retrievable again."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        name=name,
        digest=digest(secret),
        prefix=secret[:10],
        is_admin=is_admin,
        allowed_models=allowed_models,
        user_id=user_id,
        created_at=utcnow(),
    )
    session.add(key)
    await session.flush()
    return key, secret


async def find_active_key(session: AsyncSession, *, secret: str) -> ApiKey | None:
    """The key with this secret, unless it is revoked or its user is disabled."""
    wanted = digest(secret)
    row = (
        await session.execute(
            select(ApiKey, User.disabled_at)
            .outerjoin(User, User.id == ApiKey.user_id)
            .where(ApiKey.digest == wanted)
        )
    ).first()
    if row is None:
        return None
    key, user_disabled_at = row
    # The index lookup already matched; the constant-time compare keeps the final check
    # free of timing differences should the lookup ever become a prefix or range scan.
    if not hmac.compare_digest(key.digest, wanted) or key.revoked_at or user_disabled_at:
        return None
    return None if expired(key) else key


async def active_key(session: AsyncSession, key_id: int) -> ApiKey | None:
    """The key with this id, unless it is revoked or its user is disabled."""
    row = (
        await session.execute(
            select(ApiKey, User.disabled_at)
            .outerjoin(User, User.id == ApiKey.user_id)
            .where(ApiKey.id == key_id)
        )
    ).first()
    if row is None or row[0].revoked_at or row[1]:
        return None
    key: ApiKey = row[0]
    return None if expired(key) else key


def expired(key: ApiKey) -> bool:
    if key.expires_at is None:
        return False
    moment = key.expires_at
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)) <= utcnow()


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    return list(await session.scalars(select(ApiKey).order_by(ApiKey.id)))


async def revoke_key(session: AsyncSession, *, key_id: int) -> bool:
    key = await session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True


async def count_keys(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(ApiKey)) or 0)
