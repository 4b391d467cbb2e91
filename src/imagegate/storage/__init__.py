"""Image bytes behind one Storage protocol (local folder now; S3-compatible later)."""

from imagegate.storage.base import Storage, StoredFile
from imagegate.storage.local import LocalStorage

__all__ = ["LocalStorage", "Storage", "StoredFile"]
