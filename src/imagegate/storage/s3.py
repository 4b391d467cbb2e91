"""S3-compatible object storage (AWS S3, MinIO, R2, ...) through obstore.

obstore was chosen by measurement (docs/benchmarks.md, "Object storage"): it puts a 4 MB PNG
as fast as aioboto3, presigns ~19x faster, and is one wheel with no Python dependencies.
Credentials come from obstore's default chain: the AWS_* variables, web identity (IRSA),
container credentials, then the instance role.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store

from imagegate.storage.base import KEY, StorageUnavailable, Swept, new_key

if TYPE_CHECKING:
    from obstore import ObjectMeta
    from obstore.store import ClientConfig, RetryConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

# One request to the store never holds a client past these: obstore's default retries for
# up to three minutes, longer than any client waits for an image.
_CLIENT: ClientConfig = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=60)}
_RETRY: RetryConfig = {"max_retries": 2, "retry_timeout": timedelta(seconds=20)}
_READY_TIMEOUT = 5.0
# The readiness check lists this (empty) folder: one cheap request that needs the bucket,
# the credentials and the list permission the sweep needs.
_READY_PROBE = ".imagegate-readyz/"
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys per request
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 presigned URLs cannot be valid longer


class S3Storage:
    def __init__(
        self,
        store: S3Store,
        *,
        link_ttl_seconds: int,
        public_base_url: str | None = None,
    ) -> None:
        self.store = store
        self.prefix = store.prefix or ""
        self.link_ttl = timedelta(seconds=link_ttl_seconds)
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.delete_batch = _DELETE_BATCH
        # Images never change under their key (a new uuid each put); a CDN may cache them.
        self._cache_control = (
            "public, max-age=86400" if public_base_url else "private, max-age=3600"
        )

    @classmethod
    def connect(
        cls,
        *,
        bucket: str,
        endpoint_url: str | None,
        region: str,
        prefix: str,
        addressing_style: Literal["path", "virtual"] | None,
        link_ttl_seconds: int,
        public_base_url: str | None = None,
    ) -> S3Storage:
        """The store for these settings; no request is made until the first use."""
        virtual = addressing_style == "virtual" or (
            addressing_style is None and endpoint_url is None
        )
        endpoint: dict[str, str] = {}
        if endpoint_url:
            # obstore expects a virtual-hosted endpoint to name the bucket itself.
            endpoint["endpoint"] = _with_bucket(endpoint_url, bucket) if virtual else endpoint_url
        store = S3Store(
            bucket,
            prefix=prefix.strip("/") or None,
            region=region,
            virtual_hosted_style_request=virtual,
            client_options={**_CLIENT, "allow_http": bool(endpoint_url and _is_http(endpoint_url))},
            retry_config=_RETRY,
            **endpoint,  # type: ignore[arg-type]
        )
        return cls(store, link_ttl_seconds=link_ttl_seconds, public_base_url=public_base_url)

    async def put(self, data: bytes, *, mime: str) -> str:
        key = new_key(mime)
        attributes = {"Content-Type": mime, "Cache-Control": self._cache_control}
        await self._call(
            "store an image", obstore.put_async(self.store, key, data, attributes=attributes)
        )
        return key

    async def read(self, key: str) -> bytes | None:
        if KEY.match(key) is None:
            return None
        try:
            result = await obstore.get_async(self.store, key)
            return bytes(await result.bytes_async())
        except FileNotFoundError:  # obstore's "not found" (never stored, or swept)
            return None
        except _FAILURES as exc:
            raise _unavailable("read an image", exc) from None

    async def link(self, key: str, base_url: str) -> str:
        """A public URL under the CDN's base, else a GET presigned for link_ttl; base_url (the
        gateway's own) is not used: the link points at the bucket."""
        if self.public_base_url is not None:
            return f"{self.public_base_url}/{quote(self._object_path(key))}"
        signing = obstore.sign_async(self.store, "GET", key, self.link_ttl)
        return await self._call("sign an image link", signing)

    async def ready(self) -> bool:
        try:
            listing = obstore.list_with_delimiter_async(self.store, _READY_PROBE)
            await asyncio.wait_for(listing, _READY_TIMEOUT)
        except (*_FAILURES, TimeoutError) as exc:
            logger.error("readiness: the object store does not answer: %s", exc)
            return False
        return True

    async def sweep(self, older_than: datetime) -> Swept:
        """List everything under the prefix (the store is scoped to it, so nothing outside it
        can be listed or deleted), and delete keys of put()'s shape modified before the cutoff,
        delete_batch (1000) per request."""
        doomed: list[str] = []
        deleted = kept = 0
        try:
            async for chunk in obstore.list(self.store, chunk_size=self.delete_batch):
                old, young = _partition(chunk, older_than)
                doomed.extend(old)
                kept += young
                while len(doomed) >= self.delete_batch:
                    deleted += await self._delete(doomed[: self.delete_batch])
                    del doomed[: self.delete_batch]
        except _FAILURES as exc:
            raise _unavailable("list images to sweep", exc) from None
        if doomed:
            deleted += await self._delete(doomed)
        return Swept(deleted=deleted, kept=kept)

    async def _delete(self, keys: Sequence[str]) -> int:
        await self._call("delete expired images", obstore.delete_async(self.store, keys))
        return len(keys)

    def _object_path(self, key: str) -> str:
        return f"{self.prefix.strip('/')}/{key}" if self.prefix.strip("/") else key

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except _FAILURES as exc:
            raise _unavailable(what, exc) from None


# What obstore raises: its own errors, and OSError subclasses (FileNotFoundError when the
# bucket or the object is missing, others for I/O).
_FAILURES = (BaseError, OSError)


def _unavailable(what: str, exc: Exception) -> StorageUnavailable:
    logger.error("object storage: could not %s: %s", what, exc)
    return StorageUnavailable(
        f"The image store could not {what}: the object storage refused or did not answer. "
        "Try again; if it persists, the operator should check the bucket, the IMAGEGATE_S3_* "
        "settings and the storage credentials."
    )


def _partition(chunk: Sequence[ObjectMeta], older_than: datetime) -> tuple[list[str], int]:
    """The keys of put()'s shape modified before the cutoff, and how many younger ones there
    are; objects of any other shape (someone else's) are neither."""
    old: list[str] = []
    young = 0
    for meta in chunk:
        if KEY.match(meta["path"]) is None:
            continue
        if meta["last_modified"] < older_than:
            old.append(meta["path"])
        else:
            young += 1
    return old, young


def _is_http(url: str) -> bool:
    return urlsplit(url).scheme == "http"


def _with_bucket(endpoint_url: str, bucket: str) -> str:
    """https://minio.example:9000 -> https://BUCKET.minio.example:9000 (virtual hosting)."""
    parts = urlsplit(endpoint_url)
    return urlunsplit(parts._replace(netloc=f"{bucket}.{parts.netloc}"))
