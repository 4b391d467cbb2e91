"""Lab v4 bearer tokens: HS256 JWTs naming a user and its token version, with an expiry.

The version (`ver`) makes tokens revocable: the service accepts a token only while it matches
the user's `token_version`, which disabling the user, a new password or an admin's
revoke-tokens bumps."""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

import jwt

_ALGORITHM = "HS256"
_ISSUER = "imagegate"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: int
    username: str
    expires_at: int
    version: int


class TokenIssuer:
    def __init__(self, secret_key: bytes, ttl_seconds: int) -> None:
        # A key of its own, derived from the server secret: a token can never double as a
        # signed file URL or the other way round.
        self._key = hmac.new(secret_key, b"imagegate jwt", hashlib.sha256).digest()
        self.ttl_seconds = ttl_seconds

    def issue(self, user_id: int, username: str, version: int) -> str:
        now = int(time.time())
        claims = {
            "iss": _ISSUER,
            "sub": str(user_id),
            "name": username,
            "ver": version,
            "iat": now,
            "exp": now + self.ttl_seconds,
        }
        return jwt.encode(claims, self._key, algorithm=_ALGORITHM)

    def verify(self, token: str) -> TokenClaims | None:
        """The claims of a valid, unexpired token of ours; None for anything else."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                issuer=_ISSUER,
                options={"require": ["exp", "sub", "iss", "ver"]},
            )
            return TokenClaims(
                int(claims["sub"]),
                str(claims.get("name", "")),
                int(claims["exp"]),
                int(claims["ver"]),
            )
        except (jwt.PyJWTError, ValueError, KeyError):
            return None


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith("sk-")
