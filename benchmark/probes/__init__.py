"""Measurements taken during training: one :class:`~.base.Probe` class each (CKA in cka.py, gradient conflict in
conflict.py, with their maths), the registry and the trainer's driver in hooks.py."""
