"""The SSRF-guarded fetcher against real HTTP(S) servers on loopback.

No test sends traffic beyond loopback: refused addresses (10.0.0.1, 169.254.169.254) are
refused before any connection is attempted, which is what these tests check.
"""

from __future__ import annotations

import asyncio
import io
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from types import TracebackType

import httpx
import pytest
from PIL import Image

from imagegate.errors import ConfigError, InvalidRequest, PayloadTooLarge
from imagegate.fetch import MAX_REDIRECTS, Fetcher, is_allowed, parse_networks

Handler = Callable[[asyncio.StreamWriter], Awaitable[None]]
LIMIT = 100_000


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = tiny_png()


async def respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    lines = [f"HTTP/1.1 {status} Whatever", "Connection: close"]
    all_headers = {"Content-Length": str(len(body)), **(headers or {})}
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()


@dataclass
class Received:
    target: str
    headers: dict[str, str]


class LoopbackServer:
    """A minimal HTTP/1.1 server (one request per connection) that records what it receives."""

    def __init__(
        self,
        routes: dict[str, Handler],
        *,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.routes = routes
        self.host = host
        self.tls = tls
        self.port = 0
        self.connections = 0
        self.received: list[Received] = []
        self._tasks: set[asyncio.Task[object]] = set()
        self._server: asyncio.Server | None = None

    def url(self, path: str, *, host: str | None = None) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    async def __aenter__(self) -> LoopbackServer:
        self._server = await asyncio.start_server(self._handle, self.host, 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            target = head[0].split(" ")[1]
            pairs = (line.split(":", 1) for line in head[1:] if line)
            self.received.append(Received(target, {k.lower(): v.strip() for k, v in pairs}))
            route = self.routes.get(target.split("?")[0])
            await (route(writer) if route else respond(writer, 404, b"no such route"))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up on purpose (size cap, timeout)
        finally:
            writer.close()
            self._tasks.discard(task)


def redirect(location: str, status: int = 302) -> Handler:
    async def handler(writer: asyncio.StreamWriter) -> None:
        await respond(writer, status, headers={"Location": location})

    return handler


async def png(writer: asyncio.StreamWriter) -> None:
    await respond(writer, 200, PNG, {"Content-Type": "image/png; charset=binary"})


async def missing(writer: asyncio.StreamWriter) -> None:
    await respond(writer, 404, b"secret-upstream-body")


async def declared_huge(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\n\r\n" + bytes(1000))
    await writer.drain()


async def streamed_huge(writer: asyncio.StreamWriter) -> None:
    # No Content-Length: the cap must hold while the body arrives.
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    for _ in range(40):
        writer.write(bytes(64 * 1024))
        await writer.drain()


async def slow(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def drip(writer: asyncio.StreamWriter) -> None:
    # Each byte arrives well within a per-read timeout; only an overall deadline stops it.
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(1000):
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.05)


async def gzipped(writer: asyncio.StreamWriter) -> None:
    await respond(writer, 200, b"\x1f\x8b...", {"Content-Encoding": "gzip"})


ROUTES: dict[str, Handler] = {
    "/image.png": png,
    "/missing": missing,
    "/declared-huge": declared_huge,
    "/streamed-huge": streamed_huge,
    "/slow": slow,
    "/drip": drip,
    "/gzip": gzipped,
    "/to-private": redirect("http://10.0.0.1/image.png"),
    "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/", 307),
    "/to-mapped": redirect("http://[::ffff:169.254.169.254]/latest/meta-data/"),
    "/relative": redirect("/image.png", 301),
    "/loop": redirect("/loop"),
    "/to-ftp": redirect("ftp://127.0.0.1/image.png"),
    "/nowhere": redirect(""),
}


@pytest.fixture
async def server() -> AsyncIterator[LoopbackServer]:
    async with LoopbackServer(ROUTES) as running:
        yield running


@pytest.fixture
async def make_fetcher() -> AsyncIterator[Callable[..., Fetcher]]:
    made: list[Fetcher] = []

    def make(**overrides: object) -> Fetcher:
        options: dict[str, object] = {"timeout": 2.0, "max_bytes": LIMIT, **overrides}
        fetcher = Fetcher(**options)  # type: ignore[arg-type]
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        await fetcher.aclose()


async def test_loopback_is_refused_by_default(
    server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    with pytest.raises(InvalidRequest, match=r"127\.0\.0\.1 is not allowed") as caught:
        await make_fetcher().fetch(server.url("/image.png"))
    assert "IMAGEGATE_FETCH_ALLOW_NETWORKS" in caught.value.message
    assert server.connections == 0


async def test_allowed_network_fetches_the_body(
    server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    fetcher = make_fetcher(allow_networks=["127.0.0.1/32"])
    body, media_type = await fetcher.fetch(server.url("/image.png"))
    assert body == PNG
    assert media_type == "image/png"
    assert server.received[0].headers["host"] == f"127.0.0.1:{server.port}"


async def test_host_name_is_kept_while_connecting_to_the_checked_address(
    server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    fetcher = make_fetcher(allow_networks=["127.0.0.0/8", "::1/128"])
    body, _ = await fetcher.fetch(server.url("/image.png", host="localhost"))
    assert body == PNG
    assert server.received[0].headers["host"] == f"localhost:{server.port}"


async def test_upstream_error_names_the_status_but_not_the_body(
    server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    fetcher = make_fetcher(allow_networks=["127.0.0.1/32"])
    with pytest.raises(InvalidRequest, match="answered 404") as caught:
        await fetcher.fetch(server.url("/missing?token=s3cret"))
    assert "secret-upstream-body" not in caught.value.message
    assert "s3cret" not in caught.value.message


@pytest.mark.parametrize("path", ["/declared-huge", "/streamed-huge"])
async def test_body_over_the_cap_is_refused(
    path: str, server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    fetcher = make_fetcher(allow_networks=["127.0.0.1/32"])
    with pytest.raises(PayloadTooLarge, match=f"limit of {LIMIT} bytes"):
        await fetcher.fetch(server.url(path))


@pytest.mark.parametrize("path", ["/slow", "/drip"])
async def test_overall_timeout(
    path: str, server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    fetcher = make_fetcher(allow_networks=["127.0.0.1/32"], timeout=0.4)
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match=r"did not answer within 0\.4 seconds"):
        await fetcher.fetch(server.url(path))
    assert time.monotonic() - started < 2


async def test_content_encoding_is_refused(
    server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    fetcher = make_fetcher(allow_networks=["127.0.0.1/32"])
    with pytest.raises(InvalidRequest, match="gzip-encoded"):
        await fetcher.fetch(server.url("/gzip"))


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ("/to-private", "10.0.0.1"),
        ("/to-metadata", "169.254.169.254"),
        ("/to-mapped", "::ffff:a9fe:a9fe"),
    ],
)
async def test_redirect_to_a_private_address_is_refused(
    path: str, refused: str, server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    fetcher = make_fetcher(allow_networks=["127.0.0.1/32"])
    with pytest.raises(InvalidRequest, match=f"{refused} is not allowed"):
        await fetcher.fetch(server.url(path))


async def test_every_redirect_hop_is_checked(make_fetcher: Callable[..., Fetcher]) -> None:
    # 127.0.0.2 is loopback too; only 127.0.0.1 is allowed, so the hop to it must not connect.
    async with LoopbackServer({"/image.png": png}, host="127.0.0.2") as target:
        routes = {"/hop": redirect(target.url("/image.png"))}
        async with LoopbackServer(routes) as first:
            guarded = make_fetcher(allow_networks=["127.0.0.1/32"])
            with pytest.raises(InvalidRequest, match=r"127\.0\.0\.2 is not allowed"):
                await guarded.fetch(first.url("/hop"))
            assert target.connections == 0

            # The same redirect is followed where the operator allowed both addresses.
            body, _ = await make_fetcher(allow_networks=["127.0.0.0/30"]).fetch(first.url("/hop"))
            assert body == PNG
            assert target.connections == 1


async def test_relative_redirect_is_followed(
    server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    fetcher = make_fetcher(allow_networks=["127.0.0.1/32"])
    body, _ = await fetcher.fetch(server.url("/relative"))
    assert body == PNG


async def test_redirect_loop_stops(
    server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    fetcher = make_fetcher(allow_networks=["127.0.0.1/32"])
    with pytest.raises(InvalidRequest, match=f"more than {MAX_REDIRECTS} redirects"):
        await fetcher.fetch(server.url("/loop"))
    assert len(server.received) == MAX_REDIRECTS + 1


@pytest.mark.parametrize(("path", "problem"), [("/to-ftp", "only http"), ("/nowhere", "where")])
async def test_bad_redirect_target_is_refused(
    path: str, problem: str, server: LoopbackServer, make_fetcher: Callable[..., Fetcher]
) -> None:
    fetcher = make_fetcher(allow_networks=["127.0.0.1/32"])
    with pytest.raises(InvalidRequest, match=problem):
        await fetcher.fetch(server.url(path))


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.png",
        "gopher://127.0.0.1:70/",
        "http:///no-host",
        "http://[not-an-ip/",
    ],
)
async def test_only_http_urls_with_a_host(url: str, make_fetcher: Callable[..., Fetcher]) -> None:
    with pytest.raises(InvalidRequest, match="URL"):
        await make_fetcher(allow_networks=["0.0.0.0/0"]).fetch(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/a.png",
        "http://0.0.0.0:8080/",
        "http://2130706433/",  # 127.0.0.1 written as one number
    ],
)
async def test_private_literal_addresses_are_refused_before_connecting(
    url: str, make_fetcher: Callable[..., Fetcher]
) -> None:
    with pytest.raises(InvalidRequest, match="is not allowed"):
        await make_fetcher().fetch(url)


REFUSED = [
    "127.0.0.1",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "100.64.0.1",  # carrier-grade NAT
    "169.254.169.254",  # cloud metadata
    "0.0.0.0",  # noqa: S104
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:127.0.0.1",
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_guard_refuses_non_public_addresses(address: str) -> None:
    assert not is_allowed(ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_guard_allows_public_addresses(address: str) -> None:
    assert is_allowed(ip_address(address))


def test_allowed_networks_override_the_guard() -> None:
    allow = parse_networks(["127.0.0.1/32", "fd00::/8"])
    assert is_allowed(ip_address("127.0.0.1"), allow)
    assert is_allowed(ip_address("::ffff:127.0.0.1"), allow)
    assert is_allowed(ip_address("fd00::5"), allow)
    assert not is_allowed(ip_address("127.0.0.2"), allow)
    assert not is_allowed(ip_address("10.0.0.1"), allow)


def test_bad_allowed_network_stops_startup() -> None:
    with pytest.raises(ConfigError, match="IMAGEGATE_FETCH_ALLOW_NETWORKS"):
        Fetcher(timeout=1, max_bytes=1, allow_networks=["10.0.0.1/8"])


@dataclass
class Certificate:
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def localhost_cert(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    folder = tmp_path_factory.mktemp("tls")
    cert = Certificate(folder / "cert.pem", folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(cert.key), "-out", str(cert.cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert


@pytest.fixture
async def tls_server(
    localhost_cert: Certificate,
) -> AsyncIterator[tuple[LoopbackServer, list[str]]]:
    server_names: list[str] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(localhost_cert.cert, localhost_cert.key)
    context.sni_callback = lambda _sock, name, _ctx: server_names.append(name or "")
    async with LoopbackServer({"/image.png": png}, tls=context) as running:
        yield running, server_names


def trusting(cert: Certificate) -> httpx.AsyncHTTPTransport:
    return httpx.AsyncHTTPTransport(verify=ssl.create_default_context(cafile=str(cert.cert)))


async def test_https_checks_the_certificate_for_the_host_name(
    tls_server: tuple[LoopbackServer, list[str]],
    localhost_cert: Certificate,
    make_fetcher: Callable[..., Fetcher],
) -> None:
    server, server_names = tls_server
    fetcher = make_fetcher(allow_networks=["127.0.0.0/8"], transport=trusting(localhost_cert))
    body, _ = await fetcher.fetch(server.url("/image.png", host="localhost"))
    assert body == PNG
    assert server_names == ["localhost"]
    assert server.received[0].headers["host"] == f"localhost:{server.port}"


async def test_https_refuses_a_certificate_for_another_name(
    tls_server: tuple[LoopbackServer, list[str]],
    localhost_cert: Certificate,
    make_fetcher: Callable[..., Fetcher],
) -> None:
    server, _ = tls_server
    fetcher = make_fetcher(allow_networks=["127.0.0.0/8"], transport=trusting(localhost_cert))
    # The certificate names only "localhost", so the bare address must fail verification.
    with pytest.raises(InvalidRequest, match="TLS certificate is not valid"):
        await fetcher.fetch(server.url("/image.png"))
    assert server.received == []
