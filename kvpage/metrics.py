"""Counters the engine keeps and reports through ``get_metrics()``.

Step time is split into phases so that the engine's own overhead (scheduling,
page bookkeeping, tensor preparation, applying results) can be told apart
from the model's forward pass (with sampling) and from building the
``RequestOutput`` objects handed back to the caller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class StepTimings:
    """Cumulative wall time of each phase of ``LLMEngine.step`` (seconds)."""

    num_steps: int = 0
    schedule_s: float = 0.0
    prepare_s: float = 0.0
    model_s: float = 0.0
    update_s: float = 0.0
    output_s: float = 0.0

    @property
    def overhead_s(self) -> float:
        """Planning, page bookkeeping, input preparation and applying results: not the model, not outputs."""
        return self.schedule_s + self.prepare_s + self.update_s

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {f"step_{k}": v for k, v in asdict(self).items()}
        out["step_overhead_s"] = self.overhead_s
        return out


@dataclass
class RequestCounters:
    num_requests_added: int = 0
    num_requests_finished: int = 0
    num_requests_aborted: int = 0
    num_requests_rejected: int = 0
