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

from kvpage.validation import is_int, is_number
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


def _parse_line(obj: object, limits: TraceLimits) -> tuple[dict[str, object], list[str]]:
    """Check one line's object; returns its fields and its problems."""
    if not isinstance(obj, dict):
        return {}, [f"expected a JSON object, got {type(obj).__name__}"]
    problems = [f"unknown field {key!r} (known: {', '.join(FIELDS)})" for key in obj if key not in FIELDS]
    arrival = obj.get("arrival_time")
    if not (is_number(arrival) and math.isfinite(arrival) and arrival >= 0):
        problems.append(f"arrival_time must be a finite number of seconds >= 0, got {arrival!r}")
    output = obj.get("output_tokens")
    if not (is_int(output) and output >= 1):
        problems.append(f"output_tokens must be an integer >= 1, got {output!r}")
    count = _prompt_length(obj, limits, problems)
    if count is not None and is_int(output) and count + output > limits.max_model_len:
        problems.append(f"prompt ({count}) + output_tokens ({output}) exceeds max_model_len ({limits.max_model_len})")
    _check_prefix(obj, count, problems)
    _check_sampling(obj, problems)
    return obj, problems


def _prompt_length(obj: dict[str, object], limits: TraceLimits, problems: list[str]) -> int | None:
    """The prompt's length, from prompt_tokens or prompt_token_ids (exactly one of them); None if invalid."""
    count, ids = obj.get("prompt_tokens"), obj.get("prompt_token_ids")
    if (count is None) == (ids is None):
        problems.append("give exactly one of prompt_tokens (a count) or prompt_token_ids (a list)")
        return None
    if ids is not None:
        if isinstance(ids, list) and ids and all(is_int(t) and 0 <= t < limits.vocab_size for t in ids):
            return len(ids)
        problems.append(f"prompt_token_ids must be a non-empty list of integers in [0, {limits.vocab_size})")
        return None
    if is_int(count) and count >= 1:
        return count
    problems.append(f"prompt_tokens must be an integer >= 1, got {count!r}")
    return None


def _check_prefix(obj: dict[str, object], count: int | None, problems: list[str]) -> None:
    group, shared = obj.get("prefix_group"), obj.get("shared_prefix_tokens", 0)
    if group is not None and not is_int(group):
        problems.append(f"prefix_group must be an integer, got {group!r}")
    if not (is_int(shared) and shared >= 0):
        problems.append(f"shared_prefix_tokens must be an integer >= 0, got {shared!r}")
    elif shared and group is None:
        problems.append("shared_prefix_tokens needs a prefix_group")
    elif count is not None and shared > count:
        problems.append(f"shared_prefix_tokens ({shared}) exceeds the prompt ({count} tokens)")


def _check_sampling(obj: dict[str, object], problems: list[str]) -> None:
    n, width = obj.get("n", 1), obj.get("beam_width", 0)
    if not (is_int(n) and n >= 1):
        problems.append(f"n must be an integer >= 1, got {n!r}")
    if not (is_int(width) and width >= 0):
        problems.append(f"beam_width must be an integer >= 0, got {width!r}")
    elif width and is_int(n) and n > width:
        problems.append(f"n ({n}) exceeds beam_width ({width})")
    if not is_int(obj.get("priority", 0)):
        problems.append(f"priority must be an integer, got {obj.get('priority')!r}")


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
    assert group is None or is_int(group)  # as _parse_line checked
    shared = _checked_int(fields, "shared_prefix_tokens", 0)
    if ids is None:
        count = _checked_int(fields, "prompt_tokens")
        rng = random.Random(f"line-{number}")  # distinct ids per line, the same every time
        vocab = range(FIRST_TOKEN_ID, limits.vocab_size)
        prefix = _group_prefix(group, shared, vocab) if group is not None else ()
        ids = prefix + tuple(rng.choices(vocab, k=count - len(prefix)))
    assert isinstance(ids, (list, tuple))
    arrival = fields["arrival_time"]
    assert is_number(arrival)
    return WorkloadRequest(prompt_token_ids=tuple(ids), output_tokens=_checked_int(fields, "output_tokens"),
                           arrival_time=float(arrival), n=_checked_int(fields, "n", 1), prefix_group=group,
                           shared_prefix_tokens=shared, beam_width=_checked_int(fields, "beam_width", 0),
                           priority=_checked_int(fields, "priority", 0))


def _checked_int(fields: dict[str, object], name: str, default: int | None = None) -> int:
    """A field that _parse_line has checked to be an integer (or absent, with a default)."""
    value = fields.get(name, default)
    assert is_int(value), (name, value)
    return value


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
        obj: dict[str, object] = {"arrival_time": round(r.arrival_time, 6),
                                  "prompt_token_ids": list(r.prompt_token_ids),
                                  "output_tokens": r.output_tokens}
        for key, default in (("n", 1), ("beam_width", 0), ("priority", 0)):
            if getattr(r, key) != default:
                obj[key] = getattr(r, key)
        lines.append(json.dumps(obj))
    return "\n".join(lines) + "\n"
