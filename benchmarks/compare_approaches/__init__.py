"""Helpers of ``benchmarks/compare.py``: the workload, one runner per way of training, the
memory monitor and the report. See that script's docstring for what is compared and why."""

APPROACHES = (
    "sequential",
    "task_parallel",
    "ddp",
    "ray_tune",
    "model_averaging",
    "mop",
    "mop_deterministic",
)
