"""A loopback reverse proxy that publishes a server under a path prefix, as nginx's
`location /imagegate/ { proxy_pass http://upstream/; }` does: it strips the prefix, forwards the
request with its Host header unchanged and streams the answer back as it arrives (an event
stream passes through unbuffered). A path outside the prefix is a 404 from the proxy itself, so
a page that builds a URL without the root path breaks the way it would behind a real proxy.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
from aiohttp import web

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones aiohttp sets itself.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class PrefixProxy:
    """Forward `{prefix}/...` to `{upstream}/...`; see the module docstring."""

    def __init__(self, upstream: str, prefix: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.prefix = prefix.rstrip("/")
        self.requests: list[tuple[str, str, int]] = []
        """(method, path as the browser sent it, status) of every request, for diagnostics."""
        self._client: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if path != self.prefix and not path.startswith(self.prefix + "/"):
            self.requests.append((request.method, path, 404))
            return web.Response(status=404, text=f"outside the proxy's prefix {self.prefix}")
        assert self._client is not None
        target = self.upstream + (path[len(self.prefix) :] or "/")
        if request.rel_url.raw_query_string:
            target += "?" + request.rel_url.raw_query_string
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["X-Forwarded-Prefix"] = self.prefix
        body = await request.read()
        async with self._client.request(
            request.method,
            target,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            self.requests.append((request.method, path, upstream.status))
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)  # each chunk as it comes: SSE stays live
            await response.write_eof()
            return response

    async def _serve(self, ready: threading.Event, stop: asyncio.Event, where: list[str]) -> None:
        self._client = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            skip_auto_headers={"User-Agent", "Accept-Encoding"},
        )
        server = web.Server(self.handle)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        where.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
        ready.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await self._client.close()


@contextmanager
def prefix_proxy(upstream: str, prefix: str) -> Iterator[tuple[str, PrefixProxy]]:
    """Run a PrefixProxy on a free loopback port in a thread; yields (its URL with the prefix,
    the proxy) until the block ends."""
    proxy = PrefixProxy(upstream, prefix)
    loop = asyncio.new_event_loop()
    ready, where = threading.Event(), []
    stop = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(proxy._serve(ready, stop, where))
        loop.close()

    thread = threading.Thread(target=run, name="prefix-proxy", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the prefix proxy did not start within 10 s")
    try:
        yield where[0] + proxy.prefix, proxy
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
