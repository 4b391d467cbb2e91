"""getToken throttling: failed logins counted per username and per client address.

Each attempt is counted before its password is checked, so parallel guesses cannot slip past
the limit while argon2 runs, and a successful one is taken back (and clears its username's
count). More than `max_failures` attempts within `window` seconds of the first lock that
username, or that address, until the window ends: a correct password is refused too, and no
argon2 work is spent on a locked login. The counters live in the process, or in Redis when
IMAGEGATE_REDIS_URL is set, so that every server process shares them.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Protocol

from imagegate.errors import RateLimited

MAX_KEYS = 100_000
"""In-process counters kept before the expired ones are dropped."""


class LoginCounter(Protocol):
    async def attempt(self, keys: tuple[str, ...], limit: int, window: float) -> list[float]:
        """Count one attempt on each key; per key, the seconds it stays locked (0: open)."""
        ...

    async def forgive(self, key: str) -> None:
        """Take one attempt back (it succeeded)."""
        ...

    async def clear(self, key: str) -> None: ...

    async def close(self) -> None: ...


class MemoryLoginCounter:
    """Counters in this process: key -> (attempts, when the window ends on the monotonic clock)."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, float]] = {}

    async def attempt(self, keys: tuple[str, ...], limit: int, window: float) -> list[float]:
        now = time.monotonic()
        if len(self._counts) > MAX_KEYS:
            self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
        waits = []
        for key in keys:
            count, ends = self._counts.get(key, (0, now + window))
            if ends <= now:
                count, ends = 0, now + window
            self._counts[key] = (count + 1, ends)
            waits.append(ends - now if count + 1 > limit else 0.0)
        return waits

    async def forgive(self, key: str) -> None:
        count, ends = self._counts.get(key, (0, 0.0))
        if count > 1:
            self._counts[key] = (count - 1, ends)
        else:
            self._counts.pop(key, None)

    async def clear(self, key: str) -> None:
        self._counts.pop(key, None)

    async def close(self) -> None:
        return None


# KEYS: the counters; ARGV: window in ms, limit. Returns per key the ms it stays locked (0: open).
_ATTEMPT = """
local waits = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCR', key)
  if n == 1 or redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, ARGV[1]) end
  if n > tonumber(ARGV[2]) then waits[i] = redis.call('PTTL', key) else waits[i] = 0 end
end
return waits
"""

_FORGIVE = """
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('DECR', KEYS[1]) <= 0 then
  redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLoginCounter:
    """Counters in Redis, counted and checked by one script (atomic across processes)."""

    def __init__(self, url: str, prefix: str = "imagegate:login:") -> None:
        import redis.asyncio as redis

        self._redis: Any = redis.from_url(url)
        self._attempt: Any = self._redis.register_script(_ATTEMPT)
        self._forgive: Any = self._redis.register_script(_FORGIVE)
        self.prefix = prefix

    async def attempt(self, keys: tuple[str, ...], limit: int, window: float) -> list[float]:
        names = [self.prefix + key for key in keys]
        waits = await self._attempt(keys=names, args=[max(1, int(window * 1000)), limit])
        return [max(0, int(ms)) / 1000 for ms in waits]

    async def forgive(self, key: str) -> None:
        await self._forgive(keys=[self.prefix + key])

    async def clear(self, key: str) -> None:
        await self._redis.delete(self.prefix + key)

    async def close(self) -> None:
        await self._redis.aclose()


class LoginThrottle:
    def __init__(
        self,
        counter: LoginCounter | None = None,
        *,
        max_failures: int = 10,
        window_seconds: float = 300.0,
    ) -> None:
        self.counter: LoginCounter = counter or MemoryLoginCounter()
        self.max_failures = max_failures
        self.window_seconds = window_seconds

    @classmethod
    def create(
        cls,
        redis_url: str | None,
        *,
        max_failures: int,
        window_seconds: float,
        prefix: str = "imagegate:login:",
    ) -> LoginThrottle:
        counter = RedisLoginCounter(redis_url, prefix) if redis_url else MemoryLoginCounter()
        return cls(counter, max_failures=max_failures, window_seconds=window_seconds)

    async def attempt(self, username: str, address: str) -> None:
        """Count a login attempt; RateLimited (429, Retry-After) while either is locked."""
        keys = (_key("user", username), _key("addr", address))
        waits = await self.counter.attempt(keys, self.max_failures, self.window_seconds)
        wait = max(waits)
        if wait <= 0:
            return
        which = "this username" if waits[0] >= waits[1] else "this address"
        seconds = max(1, math.ceil(wait))
        error = RateLimited(
            f"Too many failed logins for {which}: at most {self.max_failures} in "
            f"{self.window_seconds:g} s. Retry after {seconds} s.",
            param="username" if which == "this username" else None,
        )
        error.retry_after = seconds
        raise error

    async def succeeded(self, username: str, address: str) -> None:
        """The password was right: its username starts afresh, its address gets the try back."""
        await self.counter.clear(_key("user", username))
        await self.counter.forgive(_key("addr", address))

    async def close(self) -> None:
        await self.counter.close()


def _key(kind: str, value: str) -> str:
    # Hashed: usernames tried can be any 100 characters; the counters' keys stay short.
    return f"{kind}:{hashlib.sha256(value.encode()).hexdigest()[:32]}"
