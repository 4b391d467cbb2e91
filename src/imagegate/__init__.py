"""imagegate: a self-hosted image-generation gateway and server."""

__version__ = "0.1.0"
