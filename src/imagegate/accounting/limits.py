"""Rate limits per key and per user: requests per minute, images per minute, requests in flight.

Per minute counts use a sliding window counter: the current minute's count plus the previous
minute's, weighted by how much of it still lies in the last 60 seconds. It needs two counters
per subject and limit instead of a log of every request, and is what Redis can check and
update in one atomic script. `MemoryLimiter` keeps the counters in the process (one server);
`RedisLimiter` shares them between processes (IMAGEGATE_REDIS_URL).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from imagegate.errors import PermissionDenied, RateLimited

WINDOW = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    ipm: int | None = None
    concurrency: int | None = None

    @property
    def empty(self) -> bool:
        return self.rpm is None and self.ipm is None and self.concurrency is None


@dataclass(frozen=True, slots=True)
class Subject:
    """Whose limits: "key:<id>" or "user:<id>"."""

    name: str
    limits: Limits


class RateLimiter(Protocol):
    async def acquire(self, subjects: tuple[Subject, ...], images: int) -> None:
        """Count one request of `images` images, or raise RateLimited (nothing counted)."""
        ...

    async def release(self, subjects: tuple[Subject, ...]) -> None:
        """The request acquired for `subjects` has ended (frees its concurrency slot)."""
        ...

    async def close(self) -> None: ...


def estimate(previous: float, current: float, elapsed: float) -> float:
    return previous * max(0.0, 1.0 - elapsed / WINDOW) + current


def wait_seconds(previous: float, current: float, elapsed: float, limit: int, ask: int) -> int:
    """Seconds until `ask` more fit under `limit` (at least 1)."""
    room = limit - current - ask
    if room >= 0 and previous > 0:
        # Within this window: previous * (1 - (elapsed + x) / WINDOW) <= room.
        return max(1, math.ceil(WINDOW * (1.0 - room / previous) - elapsed))
    # Not before the window turns; then this window's count is the previous one, fading:
    # current * (1 - y / WINDOW) + ask <= limit.
    fade = WINDOW * (1.0 - (limit - ask) / current) if current > 0 else 0.0
    return max(1, math.ceil(WINDOW - elapsed + max(0.0, fade)))


def check_asks(subjects: tuple[Subject, ...], images: int) -> None:
    """A request for more images than a per-minute limit allows can never pass: say so."""
    for subject in subjects:
        ipm = subject.limits.ipm
        if ipm is not None and images > ipm:
            raise PermissionDenied(
                f"This request asks for {images} images but {subject.name} may make at most "
                f"{ipm} per minute: ask for fewer images, or ask an admin to raise the limit.",
                param="n",
            )


def refusal(subject: str, what: str, limit: int, retry_after: int) -> RateLimited:
    error = RateLimited(
        f"Rate limit reached for {subject}: at most {limit} {what}. Retry after "
        f"{retry_after} s, or ask an admin to raise the limit.",
        param=what.split()[0],
    )
    error.retry_after = retry_after
    return error


class MemoryLimiter:
    """Counters in this process."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[int, float, float]] = {}
        """subject:kind -> (window index, previous count, current count)"""
        self._in_flight: dict[str, int] = {}

    async def acquire(self, subjects: tuple[Subject, ...], images: int) -> None:
        check_asks(subjects, images)
        now = time.time()
        checks = [c for s in subjects for c in _checks(s, images)]
        for counter, limit, ask, what, name in checks:
            previous, current = self._read(counter, now)
            elapsed = now % WINDOW
            if estimate(previous, current, elapsed) + ask > limit:
                wait = wait_seconds(previous, current, elapsed, limit, ask)
                raise refusal(name, what, limit, wait)
        for subject in subjects:
            cap = subject.limits.concurrency
            if cap is not None and self._in_flight.get(subject.name, 0) >= cap:
                raise refusal(subject.name, "requests at once", cap, 1)
        for counter, _, ask, _, _ in checks:
            self._add(counter, now, ask)
        for subject in subjects:
            if subject.limits.concurrency is not None:
                self._in_flight[subject.name] = self._in_flight.get(subject.name, 0) + 1

    async def release(self, subjects: tuple[Subject, ...]) -> None:
        for subject in subjects:
            if subject.limits.concurrency is not None:
                self._in_flight[subject.name] = max(0, self._in_flight.get(subject.name, 0) - 1)

    async def close(self) -> None:
        return None

    def _read(self, counter: str, now: float) -> tuple[float, float]:
        index = int(now // WINDOW)
        window, previous, current = self._windows.get(counter, (index, 0.0, 0.0))
        if window == index:
            return previous, current
        if window == index - 1:
            return current, 0.0
        return 0.0, 0.0

    def _add(self, counter: str, now: float, amount: int) -> None:
        previous, current = self._read(counter, now)
        self._windows[counter] = (int(now // WINDOW), previous, current + amount)


def _checks(subject: Subject, images: int) -> list[tuple[str, int, int, str, str]]:
    """(counter, limit, amount asked, what it counts, subject) for each per-minute limit."""
    checks = []
    if subject.limits.rpm is not None:
        checks.append((f"{subject.name}:req", subject.limits.rpm, 1, "requests per minute"))
    if subject.limits.ipm is not None:
        checks.append((f"{subject.name}:img", subject.limits.ipm, images, "images per minute"))
    return [(*check, subject.name) for check in checks]


# KEYS: for each per-minute check, its current and previous window key; then one concurrency
# key per subject with a cap. ARGV: elapsed, then limit and amount per check, then the caps.
_ACQUIRE = """
local elapsed = tonumber(ARGV[1])
local checks = tonumber(ARGV[2])
local caps = tonumber(ARGV[3])
for i = 1, checks do
  local current = tonumber(redis.call('GET', KEYS[2*i-1]) or '0')
  local previous = tonumber(redis.call('GET', KEYS[2*i]) or '0')
  local limit = tonumber(ARGV[3 + 2*i - 1])
  local ask = tonumber(ARGV[3 + 2*i])
  if previous * math.max(0, 1 - elapsed / 60) + current + ask > limit then
    return {1, i, tostring(previous), tostring(current)}
  end
end
for j = 1, caps do
  local key = KEYS[2*checks + j]
  local cap = tonumber(ARGV[3 + 2*checks + j])
  if tonumber(redis.call('GET', key) or '0') >= cap then
    return {2, j, '0', '0'}
  end
end
for i = 1, checks do
  redis.call('INCRBY', KEYS[2*i-1], tonumber(ARGV[3 + 2*i]))
  redis.call('EXPIRE', KEYS[2*i-1], 130)
end
for j = 1, caps do
  redis.call('INCR', KEYS[2*checks + j])
  redis.call('EXPIRE', KEYS[2*checks + j], 900)
end
return {0, 0, '0', '0'}
"""


# Never below zero: a slot released after its key expired must not grant an extra one.
_RELEASE = """
local left = redis.call('DECR', KEYS[1])
if left <= 0 then redis.call('DEL', KEYS[1]) end
return left
"""


class RedisLimiter:
    """Counters in Redis, checked and counted by one Lua script (atomic across processes)."""

    def __init__(self, url: str, prefix: str = "imagegate:rl:") -> None:
        import redis.asyncio as redis

        self._redis: Any = redis.from_url(url)
        self._script: Any = self._redis.register_script(_ACQUIRE)
        self._release: Any = self._redis.register_script(_RELEASE)
        self.prefix = prefix

    async def acquire(self, subjects: tuple[Subject, ...], images: int) -> None:
        check_asks(subjects, images)
        now = time.time()
        index = int(now // WINDOW)
        checks = [c for s in subjects for c in _checks(s, images)]
        capped = [s for s in subjects if s.limits.concurrency is not None]
        keys = [k for c in checks for k in (self._key(c[0], index), self._key(c[0], index - 1))]
        keys += [self._key(f"{s.name}:conc") for s in capped]
        args: list[Any] = [now % WINDOW, len(checks), len(capped)]
        args += [v for c in checks for v in (c[1], c[2])]
        args += [s.limits.concurrency for s in capped]
        verdict, which, previous, current = await self._script(keys=keys, args=args)
        if int(verdict) == 1:
            _, limit, ask, what, subject = checks[int(which) - 1]
            wait = wait_seconds(float(previous), float(current), now % WINDOW, limit, ask)
            raise refusal(subject, what, limit, wait)
        if int(verdict) == 2:
            subject_limits = capped[int(which) - 1]
            raise refusal(
                subject_limits.name, "requests at once", subject_limits.limits.concurrency or 0, 1
            )

    async def release(self, subjects: tuple[Subject, ...]) -> None:
        for subject in subjects:
            if subject.limits.concurrency is not None:
                await self._release(keys=[self._key(f"{subject.name}:conc")])

    async def close(self) -> None:
        await self._redis.aclose()

    def _key(self, counter: str, index: int | None = None) -> str:
        return f"{self.prefix}{counter}" + ("" if index is None else f":{index}")
