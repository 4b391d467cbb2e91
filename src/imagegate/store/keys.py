"""API keys: `sk-...` secrets shown once, stored as sha256 digests."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import func, select

from imagegate.store.db import AsyncSession
from imagegate.store.models import ApiKey, utcnow

KEY_PREFIX = "sk-"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_key(
    session: AsyncSession,
    *,
    name: str,
    is_admin: bool = False,
    allowed_models: list[str] | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the secret, which is never retrievable again."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        name=name,
        digest=digest(secret),
        prefix=secret[:10],
        is_admin=is_admin,
        allowed_models=allowed_models,
        created_at=utcnow(),
    )
    session.add(key)
    await session.flush()
    return key, secret


async def find_active_key(session: AsyncSession, *, secret: str) -> ApiKey | None:
    wanted = digest(secret)
    key = await session.scalar(select(ApiKey).where(ApiKey.digest == wanted))
    # The index lookup already matched; the constant-time compare keeps the final check
    # free of timing differences should the lookup ever become a prefix or range scan.
    if key is None or not hmac.compare_digest(key.digest, wanted) or key.revoked_at:
        return None
    return key


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
