"""Fetch client-supplied image URLs without letting clients reach the gateway's own network.

Guard against server-side request forgery (SSRF): every hop (the URL and each redirect) is
resolved once, every address it resolves to must be public unless an operator allowed its
network, and the connection goes to that checked address, not to a fresh DNS answer, so a
name that re-resolves between check and connect (DNS rebinding) cannot slip through. The Host
header, TLS SNI and certificate check still use the original host name.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Sequence
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Self

import httpx

from imagegate.config import Settings
from imagegate.errors import ConfigError, InvalidRequest, PayloadTooLarge

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CGNAT = IPv4Network("100.64.0.0/10")
# NAT64 prefixes: a local NAT64 gateway translates these to the IPv4 address in the low bits.
_NAT64 = (IPv6Network("64:ff9b::/96"), IPv6Network("64:ff9b:1::/48"))
_ALLOW_HINT = (
    "an operator can allow a private network with IMAGEGATE_FETCH_ALLOW_NETWORKS "
    '(e.g. ["10.0.0.0/8"])'
)


def parse_networks(cidrs: Sequence[str]) -> tuple[IPNetwork, ...]:
    """Parse the operator's allowed CIDRs; a typo stops startup rather than being ignored."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ip_network(cidr.strip()))
        except ValueError as exc:
            raise ConfigError(
                f"IMAGEGATE_FETCH_ALLOW_NETWORKS: {cidr!r} is not a network: write CIDRs "
                f'like "10.0.0.0/8" or "127.0.0.1/32" ({exc}).'
            ) from exc
    return tuple(networks)


def embedded_ipv4(address: IPAddress) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), if any."""
    if isinstance(address, IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in _NAT64):
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Whether address is on the public internet (and so is any IPv4 address it embeds)."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return is_public(address.ipv4_mapped)  # ::ffff:a.b.c.d is a.b.c.d itself
    inner = embedded_ipv4(address)
    return _is_global(address) and (inner is None or is_public(inner))


def _is_global(address: IPAddress) -> bool:
    # is_global alone is not enough: Python 3.11 counts multicast as global.
    special = (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or (isinstance(address, IPv6Address) and address.is_site_local)
        or (isinstance(address, IPv4Address) and address in _CGNAT)
    )
    return address.is_global and not special


def is_allowed(address: IPAddress, allow: Sequence[IPNetwork] = ()) -> bool:
    """Whether the fetcher may connect to address: public, or in an operator-allowed network."""
    inner = embedded_ipv4(address)
    candidates = (address,) if inner is None else (address, inner)
    if any(c in net for c in candidates for net in allow if c.version == net.version):
        return True
    return is_public(address)


def _shown(url: httpx.URL) -> str:
    """The URL for messages and logs: no credentials or query (it may carry signed tokens)."""
    text = f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}"
    return text if len(text) <= 120 else text[:117] + "..."


class Fetcher:
    """Downloads image URLs for clients, refusing private addresses and oversized bodies."""

    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        allow_networks: Sequence[str] = (),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._allow = parse_networks(allow_networks)
        # Redirects are followed by hand so that every hop goes through the guard; proxies
        # from the environment are ignored because they would connect on our behalf.
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(
            timeout=settings.fetch_timeout_seconds,
            max_bytes=settings.max_image_bytes,
            allow_networks=settings.fetch_allow_networks,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> tuple[bytes, str | None]:
        """The body and media type (without parameters) of an http(s) URL."""
        current = _parse(url)
        try:
            # One deadline for the whole exchange (DNS, redirects, a slowly dripped body):
            # httpx's own timeouts apply per operation, which a trickling server can evade.
            async with asyncio.timeout(self._timeout):
                return await self._follow(current)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise InvalidRequest(
                f"Could not fetch image URL {_shown(current)}: it did not answer within "
                f"{self._timeout:g} seconds."
            ) from exc
        except httpx.TransportError as exc:
            raise InvalidRequest(
                f"Could not fetch image URL {_shown(current)}: {_reason(exc)}."
            ) from exc

    async def check(self, url: str) -> None:
        """Refuse now a URL that `post` would refuse (bad scheme, private address)."""
        await self._resolve(_parse(url))

    async def post(self, url: str, content: bytes, headers: dict[str, str]) -> int:
        """POST a body to a client's URL (task callbacks) through the same address guard.

        Returns the status code; redirects are not followed and the answer body is not read.
        Raises InvalidRequest when the URL is refused or cannot be reached in time.
        """
        target = _parse(url)
        try:
            async with asyncio.timeout(self._timeout):
                address = (await self._resolve(target))[0]
                request = self._client.build_request(
                    "POST",
                    target.copy_with(host=str(address)),
                    headers={**_headers(target), "Accept": "*/*", **headers},
                    content=content,
                    extensions={"sni_hostname": target.raw_host.decode("ascii")},
                )
                # The answer's body is never read: a receiver cannot make us buffer anything.
                response = await self._client.send(request, stream=True)
                await response.aclose()
                return response.status_code
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise InvalidRequest(f"{_shown(target)} did not answer in time.") from exc
        except httpx.TransportError as exc:
            raise InvalidRequest(f"Could not reach {_shown(target)}: {_reason(exc)}.") from exc

    async def _follow(self, url: httpx.URL) -> tuple[bytes, str | None]:
        for _ in range(MAX_REDIRECTS + 1):
            response = await self._send(url)
            try:
                if response.status_code not in _REDIRECTS:
                    return await self._body(url, response), _media_type(response)
                url = _redirect_target(url, response)
            finally:
                await response.aclose()
        raise InvalidRequest(
            f"Could not fetch image URL {_shown(url)}: more than {MAX_REDIRECTS} redirects; "
            "link the image's final address."
        )

    async def _send(self, url: httpx.URL) -> httpx.Response:
        host = url.raw_host.decode("ascii")
        addresses = await self._resolve(url)
        for address in addresses[:-1]:
            try:
                return await self._send_to(url, address, host)
            except httpx.ConnectError:
                continue  # try the host's next address, as a browser would
        return await self._send_to(url, addresses[-1], host)

    async def _send_to(self, url: httpx.URL, address: IPAddress, host: str) -> httpx.Response:
        # Connect to the checked address; keep the name for Host, SNI and the certificate.
        request = self._client.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers=_headers(url),
            extensions={"sni_hostname": host},
        )
        return await self._client.send(request, stream=True)

    async def _resolve(self, url: httpx.URL) -> list[IPAddress]:
        host = url.raw_host.decode("ascii")
        port = url.port or _DEFAULT_PORTS[url.scheme]
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            infos = []
        addresses = list(dict.fromkeys(ip_address(info[4][0]) for info in infos))
        if not addresses:
            raise InvalidRequest(
                f"Could not fetch image URL {_shown(url)}: the host name does not resolve."
            )
        for address in addresses:
            if not is_allowed(address, self._allow):
                raise InvalidRequest(
                    f"Could not fetch image URL {_shown(url)}: its address {address} is not "
                    f"allowed (private, loopback or otherwise not public); {_ALLOW_HINT}."
                )
        return addresses

    async def _body(self, url: httpx.URL, response: httpx.Response) -> bytes:
        if not response.is_success:
            raise InvalidRequest(
                f"Could not fetch image URL {_shown(url)}: the server answered "
                f"{response.status_code}; check that the link is public and still valid."
            )
        # Read the body exactly as sent: a compressed body could inflate far past the cap
        # within a single chunk, and image formats are compressed already.
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InvalidRequest(
                f"Could not fetch image URL {_shown(url)}: the server sent it {encoding}-"
                "encoded; serve the image without content encoding."
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise self._too_large(url)
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > self._max_bytes:
                raise self._too_large(url)
        return bytes(body)

    def _too_large(self, url: httpx.URL) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"Image URL {_shown(url)} is larger than the limit of {self._max_bytes} bytes: "
            "link a smaller or more compressed image."
        )


def _parse(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL as exc:
        raise InvalidRequest(f"Invalid image URL: {exc}.") from exc
    if parsed.scheme not in _DEFAULT_PORTS or not parsed.raw_host:
        raise InvalidRequest(
            f"Invalid image URL {_shown(parsed)}: only http:// and https:// URLs with a host "
            "can be fetched."
        )
    return parsed


def _redirect_target(url: httpx.URL, response: httpx.Response) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise InvalidRequest(
            f"Could not fetch image URL {_shown(url)}: the server answered "
            f"{response.status_code} without saying where to."
        )
    # Join against the URL as the client wrote it, not the address we connected to.
    return _parse(str(url.join(location)))


def _headers(url: httpx.URL) -> dict[str, str]:
    headers = {
        "Host": url.netloc.decode("ascii"),
        "Accept": "image/png, image/jpeg, image/webp",
        "Accept-Encoding": "identity",
        "User-Agent": "imagegate",
    }
    if url.scheme == "https":
        # The pool keys connections by the address we connect to, so a kept-alive TLS
        # connection verified for one host name could be reused for another name on the same
        # address without checking its certificate. Closing TLS connections prevents that.
        headers["Connection"] = "close"
    return headers


def _media_type(response: httpx.Response) -> str | None:
    value = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return value or None


def _reason(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"its TLS certificate is not valid for the host ({cause.verify_message})"
        cause = cause.__cause__ or cause.__context__
    return f"the connection failed ({type(exc).__name__})"
