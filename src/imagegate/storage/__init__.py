"""Image bytes behind one Storage protocol: a local folder, or S3-compatible object storage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imagegate.errors import ConfigError
from imagegate.storage.base import Storage, StorageUnavailable, StoredFile, Swept
from imagegate.storage.local import LocalStorage
from imagegate.storage.signing import UrlSigner

if TYPE_CHECKING:
    from imagegate.config import Settings

__all__ = [
    "LocalStorage",
    "Storage",
    "StorageUnavailable",
    "StoredFile",
    "Swept",
    "storage_from_settings",
]


def storage_from_settings(settings: Settings, signer: UrlSigner | None = None) -> Storage:
    """The configured store; `signer` signs local /files links (None: no links are made).
    Makes no request: a bad bucket or credentials show in /readyz and on first use."""
    if settings.storage == "local":
        return LocalStorage(settings.resolved_storage_dir, signer)
    from imagegate.storage.s3 import MAX_PRESIGN_SECONDS, S3Storage

    if not settings.s3_bucket:
        raise ConfigError(
            "IMAGEGATE_STORAGE=s3 needs IMAGEGATE_S3_BUCKET: set it to the name of the bucket "
            "images are kept in (and IMAGEGATE_S3_ENDPOINT_URL for an S3 API other than AWS's)."
        )
    if settings.s3_public_base_url is None and settings.url_ttl_seconds > MAX_PRESIGN_SECONDS:
        raise ConfigError(
            f"IMAGEGATE_URL_TTL_SECONDS={settings.url_ttl_seconds} is longer than a presigned "
            f"S3 link can be valid ({MAX_PRESIGN_SECONDS} seconds, 7 days): lower it, or serve "
            "the bucket through a CDN and set IMAGEGATE_S3_PUBLIC_BASE_URL."
        )
    try:
        return S3Storage.connect(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            prefix=settings.s3_prefix,
            addressing_style=settings.s3_addressing_style,
            link_ttl_seconds=settings.url_ttl_seconds,
            public_base_url=settings.s3_public_base_url,
        )
    except Exception as exc:  # obstore's own configuration errors (malformed endpoint, ...)
        raise ConfigError(
            f"Cannot set up S3 storage from the IMAGEGATE_S3_* settings: {exc}"
        ) from exc
