"""Host lists to device tensors without waiting for the device.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory makes
PyTorch synchronize the stream after the copy: the host then waits for every
kernel queued before it. With asynchronous scheduling the previous step is
still running when the next one's inputs are built, so one such copy would
serialize the two. Every per-step copy goes through :func:`to_device`
instead: pinned host memory and a non-blocking copy, ordered on the stream
after the work already queued, with the host free to go on at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["to_device", "to_device_segments"]


def to_device(values: Sequence[int] | Sequence[float] | Sequence[bool] | Sequence[Sequence[int]],
              dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype)`` on ``device``, copied asynchronously from pinned memory on a GPU."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host if device.type == "cpu" else host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_device_segments(segments: Sequence[Sequence[int]], dtype: torch.dtype,
                       device: torch.device) -> list[torch.Tensor]:
    """Several integer lists in one asynchronous copy, as views that each start 16-byte aligned.

    Triton compiles a kernel anew for every pattern of 16-byte alignment of its
    pointer arguments; views packed back to back would start at offsets that
    vary from step to step with the batch, and each new pattern would cost a
    compilation (about a second) in the middle of serving.
    """
    per_16_bytes = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    flat: list[int] = []
    bounds = []
    for segment in segments:
        start = len(flat)
        flat.extend(segment)
        bounds.append((start, len(flat)))
        flat.extend([0] * (-len(flat) % per_16_bytes))
    packed = to_device(flat, dtype, device)
    return [packed[start:stop] for start, stop in bounds]
