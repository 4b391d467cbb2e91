"""Image backends: one module per provider behind the Provider protocol (see base.py)."""
