"""Sweeps: presets (preset.py), their expansion (plan.py), the job (job.py), run states (status.py), the
submission (dispatch.py) through one of the executors (executors/)."""
