"""Who is calling: API keys and tokens to principals, with a short cache, and logins."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from imagegate.auth.passwords import verify_password_async
from imagegate.auth.principal import Principal, key_principal, user_principal
from imagegate.auth.throttle import LoginThrottle
from imagegate.auth.tokens import TokenIssuer, looks_like_jwt
from imagegate.errors import AuthenticationFailed
from imagegate.store import keys as key_store
from imagegate.store import users as user_store
from imagegate.store.ledger import Account
from imagegate.store.models import ApiKey, User

Forget = Callable[[Account], None]
"""Drops what this process caches about an account (Billing.forget: its balance)."""


class Authenticator:
    """Turns a bearer secret into a `Principal`. Answers are cached for
    `key_cache_seconds` (IMAGEGATE_KEY_CACHE_SECONDS) to save a database round trip per
    request; `forget_*` drops a revoked key or disabled user at once, and `forget_account`
    (the billing's cache of balances) with it."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        tokens: TokenIssuer,
        logins: LoginThrottle | None = None,
        key_cache_seconds: float = 0.0,
        forget_account: Forget | None = None,
    ) -> None:
        self.sessions = sessions
        self.tokens = tokens
        self.logins = logins or LoginThrottle()
        self.key_cache_seconds = key_cache_seconds
        self._forget_account = forget_account
        # digest -> (principal, expiry): saves a database round trip per request.
        self._keys: dict[str, tuple[Principal, float]] = {}
        # Bumped by every forget_*: a check that began before a revocation must not put its
        # (by then stale) answer in the cache after the revocation emptied it.
        self._revocations = 0

    async def authenticate(self, secret: str | None) -> Principal:
        """The caller behind an API key (`sk-...`) or a token from getToken (a JWT)."""
        if not secret:
            raise AuthenticationFailed(
                "Missing API key: send the header 'Authorization: Bearer sk-...'. "
                "Create a key with `imagegate keys create`."
            )
        digest = key_store.digest(secret)
        cached = self._keys.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        revocations = self._revocations
        if looks_like_jwt(secret):
            principal = await self._token_principal(secret)
        else:
            principal = await self._key_principal(secret)
        if self.key_cache_seconds > 0 and revocations == self._revocations:
            if len(self._keys) > 10_000:
                self._keys.clear()
            self._keys[digest] = (principal, time.monotonic() + self.key_cache_seconds)
        return principal

    async def _key_principal(self, secret: str) -> Principal:
        async with self.sessions() as session:
            key = await key_store.find_active_key(session, secret=secret)
            if key is None:
                raise AuthenticationFailed(
                    "Invalid, revoked or expired API key: check the key, or create a "
                    "new one with `imagegate keys create`."
                )
            return key_principal(key, await _owner_of(session, key))

    async def _token_principal(self, token: str) -> Principal:
        claims = self.tokens.verify(token)
        user = None
        if claims is not None:
            async with self.sessions() as session:
                user = await user_store.active_user(session, claims.user_id)
        if claims is None or user is None:
            raise AuthenticationFailed(
                "Invalid or expired token: get a new one from POST /prod-api/v3/auth/getToken."
            )
        if claims.version != user.token_version:
            raise AuthenticationFailed(
                "This token was revoked (a new password, the user disabled, or an admin's "
                "revoke-tokens): get a new one from POST /prod-api/v3/auth/getToken."
            )
        return user_principal(user)

    async def login(self, username: str, password: str, address: str) -> str:
        """A signed token for a user's name and password (getToken)."""
        user = await self.check_password(username, password, address)
        return self.tokens.issue(user.id, user.username, user.token_version)

    async def check_password(self, username: str, password: str, address: str) -> User:
        """The active user with this name and password (getToken, the console's sign-in).

        Unknown users and wrong passwords get the same answer after the same work. Failed
        attempts are throttled per username and per client `address` (429 with Retry-After).
        """
        await self.logins.attempt(username, address)
        async with self.sessions() as session:
            user = await user_store.find_user(session, username=username)
        hashed = user.password_hash if user is not None else None
        matches = await verify_password_async(hashed, password)
        if user is None or not matches or user.disabled_at is not None:
            raise AuthenticationFailed("Invalid username or password.")
        await self.logins.succeeded(username, address)
        return user

    async def principal_for(
        self, key_id: int | None, user_id: int | None, *, token_version: int | None = None
    ) -> Principal:
        """Who submitted a task, checked again when it runs: a revoked key or a disabled user
        stops their queued tasks too. With `token_version` (a console session of a user), a
        new password or a revoke-tokens since then stops it as well."""
        async with self.sessions() as session:
            if key_id is not None:
                key = await key_store.active_key(session, key_id)
                if key is not None:
                    return key_principal(key, await _owner_of(session, key))
            elif user_id is not None:
                user = await user_store.active_user(session, user_id)
                current = (
                    token_version is None or user is None or user.token_version == token_version
                )
                if user is not None and current:
                    return user_principal(user)
        raise AuthenticationFailed(
            "The API key or user that submitted this task was revoked or disabled before it ran."
        )

    def forget_key(self, key_id: int) -> None:
        """Drop a revoked key from this process's cache at once (others expire it in seconds)."""
        self._revocations += 1
        self._keys = {d: v for d, v in self._keys.items() if v[0].key_id != key_id}
        self._forget(Account("key", key_id))

    def forget_user(self, user_id: int) -> None:
        """Drop a disabled user's keys and tokens from this process's cache at once."""
        self._revocations += 1
        self._keys = {d: v for d, v in self._keys.items() if v[0].user_id != user_id}
        self._forget(Account("user", user_id))

    def _forget(self, account: Account) -> None:
        if self._forget_account is not None:
            self._forget_account(account)

    async def close(self) -> None:
        await self.logins.close()


async def _owner_of(session: AsyncSession, key: ApiKey) -> User | None:
    return None if key.user_id is None else await session.get(User, key.user_id)
