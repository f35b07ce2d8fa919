"""``kvpage plan``: replay traffic through the real scheduler and memory manager to size a deployment.

* :mod:`kvpage.plan.trace` — JSONL traces and seeded synthetic ones;
* :mod:`kvpage.plan.cost` — step-time models: physics presets or a calibration;
* :mod:`kvpage.plan.replay` — the event-driven replay in virtual time;
* :mod:`kvpage.plan.sweep` — sweeps, SLO recommendation, thrashing onset, layout savings;
* :mod:`kvpage.plan.report` — table, markdown, PNG plots and JSON.

Everything here is pure Python: planning needs no GPU and no torch.
"""
