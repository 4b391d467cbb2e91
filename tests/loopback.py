"""Run an ASGI app with uvicorn on 127.0.0.1 in a thread: the fake upstreams and the gateway
under test are real HTTP servers on loopback, shared by every fake (tests/fake_*.py); and
`Receiver`, such a server that records the callbacks and webhooks the gateway sends it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp


class LoopbackServer:
    """Uvicorn serving an ASGI app on 127.0.0.1 (an ephemeral port) in a daemon thread.

    The socket is bound up front, so `port` and `url` are known before the server starts.
    """

    def __init__(self, app: ASGIApp, *, lifespan: Literal["on", "off"] = "off") -> None:
        config = uvicorn.Config(
            app,
            lifespan=lifespan,
            interface="asgi3",
            loop="asyncio",
            http="h11",
            ws="none",
            log_level="critical",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise RuntimeError("the loopback server did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    @contextmanager
    def running(self) -> Iterator[LoopbackServer]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


class Receiver:
    """A loopback HTTP server recording the webhooks POSTed to `url`; it answers 503 while
    `failing` says so."""

    def __init__(self, failing: Callable[[dict[str, str], bytes], bool] | None = None) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.failing = failing or (lambda headers, body: False)
        self.server = LoopbackServer(
            Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])
        )

    async def _hook(self, request: Request) -> Response:
        headers, body = dict(request.headers), await request.body()
        self.received.append((headers, body))
        if self.failing(headers, body):
            return JSONResponse({"error": "try later"}, status_code=503)
        return JSONResponse({"ok": True})

    @property
    def url(self) -> str:
        return f"{self.server.url}/hook"

    def events(self) -> list[str]:
        return [headers["x-imagegate-event"] for headers, _ in self.received]

    async def until(self, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not check():
            assert time.monotonic() < deadline, f"received only {self.events()}"
            await asyncio.sleep(0.02)
