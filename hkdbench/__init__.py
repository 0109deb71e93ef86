"""hkdbench: a benchmark and comparison suite for heterogeneous knowledge distillation."""

__version__ = "0.1.0"

# The format of every timestamp the run store writes (env.json, summary.json, jobs and sweep records): ISO 8601
# local time with its UTC offset. The analysis parses it back (wall times in the report).
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
