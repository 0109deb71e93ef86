"""hkdbench: a benchmark and comparison suite for heterogeneous knowledge distillation."""

__version__ = "0.1.0"
