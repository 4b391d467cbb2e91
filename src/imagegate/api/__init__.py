"""HTTP dialects: one folder per wire format (protocol.py + routes.py)."""
