"""Measurements: CKA (cka.py), gradient conflict (conflict.py), their trainer hook (hooks.py) and the overhead
benchmark (overhead.py)."""
