"""Traffic traces for the planner: JSONL files and seeded synthetic generators (pure Python).

A trace is one JSON object per line, one request each::

    {"arrival_time": 0.25, "prompt_tokens": 180, "output_tokens": 312}
    {"arrival_time": 0.31, "prompt_token_ids": [5, 77, 9], "output_tokens": 40, "n": 2}
    {"arrival_time": 0.40, "prompt_tokens": 900, "output_tokens": 64,
     "prefix_group": 3, "shared_prefix_tokens": 512, "priority": 0}

``arrival_time`` (seconds, >= 0) and ``output_tokens`` (>= 1) are required,
and exactly one of ``prompt_tokens`` (a count) or ``prompt_token_ids``.
Requests with the same ``prefix_group`` begin with the same
``shared_prefix_tokens`` token ids, so they hit the prefix cache as real
shared system prompts would; the rest of each prompt is distinct.
``n`` (parallel samples), ``beam_width`` (beam search) and ``priority`` are
optional.  Every malformed line is reported with its line number, all at
once: nothing is silently dropped.  Lines may come in any order; the
replay sorts them by arrival time.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from kvpage.workloads import (
    WORKLOAD_NAMES,
    Workload,
    WorkloadRequest,
    WorkloadSpec,
    make_workload,
)

FIELDS = ("arrival_time", "prompt_tokens", "prompt_token_ids", "output_tokens", "prefix_group",
          "shared_prefix_tokens", "n", "beam_width", "priority")
FIRST_TOKEN_ID = 3  # ids below are special tokens


class TraceError(ValueError):
    """A trace with malformed lines; the message lists each with its line number."""


@dataclass(frozen=True)
class TraceLimits:
    """What a line may ask for: the planned server's context and vocabulary."""

    max_model_len: int
    vocab_size: int = 32000


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_line(obj: object, limits: TraceLimits) -> tuple[dict[str, object], list[str]]:
    """Check one line's object; returns its fields and its problems."""
    if not isinstance(obj, dict):
        return {}, [f"expected a JSON object, got {type(obj).__name__}"]
    problems = [f"unknown field {key!r} (known: {', '.join(FIELDS)})" for key in obj if key not in FIELDS]
    arrival = obj.get("arrival_time")
    if not (isinstance(arrival, (int, float)) and not isinstance(arrival, bool) and math.isfinite(arrival)
            and arrival >= 0):
        problems.append(f"arrival_time must be a finite number of seconds >= 0, got {arrival!r}")
    output = obj.get("output_tokens")
    if not (_is_int(output) and output >= 1):
        problems.append(f"output_tokens must be an integer >= 1, got {output!r}")
    count, ids = obj.get("prompt_tokens"), obj.get("prompt_token_ids")
    if (count is None) == (ids is None):
        problems.append("give exactly one of prompt_tokens (a count) or prompt_token_ids (a list)")
    elif ids is not None:
        if not (isinstance(ids, list) and ids and all(_is_int(t) and 0 <= t < limits.vocab_size for t in ids)):
            problems.append(f"prompt_token_ids must be a non-empty list of integers in [0, {limits.vocab_size})")
        else:
            count = len(ids)
    elif not (_is_int(count) and count >= 1):
        problems.append(f"prompt_tokens must be an integer >= 1, got {count!r}")
    if _is_int(count) and _is_int(output) and count + output > limits.max_model_len:  # type: ignore[operator]
        problems.append(f"prompt ({count}) + output_tokens ({output}) exceeds max_model_len ({limits.max_model_len})")
    group, shared = obj.get("prefix_group"), obj.get("shared_prefix_tokens", 0)
    if group is not None and not _is_int(group):
        problems.append(f"prefix_group must be an integer, got {group!r}")
    if not (_is_int(shared) and shared >= 0):
        problems.append(f"shared_prefix_tokens must be an integer >= 0, got {shared!r}")
    elif shared and group is None:
        problems.append("shared_prefix_tokens needs a prefix_group")
    elif _is_int(count) and shared > count:  # type: ignore[operator]
        problems.append(f"shared_prefix_tokens ({shared}) exceeds the prompt ({count} tokens)")
    for name in ("n", "beam_width"):
        value = obj.get(name, 1 if name == "n" else 0)
        if not (_is_int(value) and value >= (1 if name == "n" else 0)):
            problems.append(f"{name} must be an integer >= {1 if name == 'n' else 0}, got {value!r}")
    if _is_int(obj.get("beam_width")) and obj.get("beam_width") and obj.get("n", 1) > obj["beam_width"]:
        problems.append(f"n ({obj.get('n')}) exceeds beam_width ({obj['beam_width']})")
    if not _is_int(obj.get("priority", 0)):
        problems.append(f"priority must be an integer, got {obj.get('priority')!r}")
    return obj, problems


def parse_trace(lines: list[str], limits: TraceLimits, source: str = "trace") -> Workload:
    """Parse JSONL text lines into a workload (sorted by arrival); raises TraceError listing every bad line."""
    parsed: list[tuple[int, dict[str, object]]] = []
    errors = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{source}:{number}: not valid JSON ({exc.msg})")
            continue
        fields, problems = _parse_line(obj, limits)
        errors += [f"{source}:{number}: {problem}" for problem in problems]
        if not problems:
            parsed.append((number, fields))
    if errors:
        shown = errors[:50] + ([f"... and {len(errors) - 50} more"] if len(errors) > 50 else [])
        raise TraceError(f"{len(errors)} problem(s) in {source}:\n" + "\n".join(shown))
    if not parsed:
        raise TraceError(f"{source} has no requests")
    requests = [_request(number, fields, limits) for number, fields in parsed]
    requests.sort(key=lambda r: r.arrival_time)  # stable: equal times keep file order
    return Workload(name=Path(source).stem, description=f"trace {source} ({len(requests)} requests)",
                    requests=tuple(requests))


def _request(number: int, fields: dict[str, object], limits: TraceLimits) -> WorkloadRequest:
    ids = fields.get("prompt_token_ids")
    group = fields.get("prefix_group")
    shared = int(fields.get("shared_prefix_tokens", 0))  # type: ignore[arg-type]
    if ids is None:
        count = int(fields["prompt_tokens"])  # type: ignore[arg-type]
        rng = random.Random(f"line-{number}")  # distinct ids per line, the same every time
        vocab = range(FIRST_TOKEN_ID, limits.vocab_size)
        prefix = _group_prefix(group, shared, vocab) if group is not None else ()  # type: ignore[arg-type]
        ids = prefix + tuple(rng.choices(vocab, k=count - len(prefix)))
    return WorkloadRequest(prompt_token_ids=tuple(ids), output_tokens=int(fields["output_tokens"]),  # type: ignore
                           arrival_time=float(fields["arrival_time"]), n=int(fields.get("n", 1)),  # type: ignore
                           prefix_group=group, shared_prefix_tokens=shared,  # type: ignore[arg-type]
                           beam_width=int(fields.get("beam_width", 0)),  # type: ignore[arg-type]
                           priority=int(fields.get("priority", 0)))  # type: ignore[arg-type]


def _group_prefix(group: int, length: int, vocab: range) -> tuple[int, ...]:
    # Seeded by the group alone: every member gets the same ids, whatever its line.
    return tuple(random.Random(f"group-{group}").choices(vocab, k=length))


def load_trace(path: str | Path, limits: TraceLimits) -> Workload:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TraceError(f"cannot read trace {str(path)!r}: {exc.strerror}") from None
    return parse_trace(text.splitlines(), limits, str(path))


def synthetic_trace(name: str, num_requests: int, rate: float | None, limits: TraceLimits, seed: int = 0,
                    burstiness: float = 1.0) -> Workload:
    """A seeded synthetic trace: the workloads of ``kvpage bench`` with Poisson (or gamma) arrivals."""
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"synthetic must be one of {', '.join(WORKLOAD_NAMES)}, got {name!r}")
    return make_workload(WorkloadSpec(name=name, num_requests=num_requests, seed=seed, vocab_size=limits.vocab_size,
                                      max_model_len=limits.max_model_len, request_rate=rate, burstiness=burstiness))


def dump_trace(workload: Workload) -> str:
    """The workload as JSONL, with its prompt token ids, so that it parses back to the same requests."""
    lines = []
    for r in workload.requests:
        obj: dict[str, object] = {"arrival_time": round(r.arrival_time, 6), "prompt_token_ids": list(r.prompt_token_ids),
                                  "output_tokens": r.output_tokens}
        for key, default in (("n", 1), ("beam_width", 0), ("priority", 0)):
            if getattr(r, key) != default:
                obj[key] = getattr(r, key)
        lines.append(json.dumps(obj))
    return "\n".join(lines) + "\n"
