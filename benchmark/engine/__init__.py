"""The training engine: optimiser and schedule, the step, evaluation, checkpoints, the run lifecycle (trainer),
stop signals, distributed training."""
