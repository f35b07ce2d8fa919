"""Validation helpers: one way to check a value and to say why it is refused.

Every user-facing value (engine options, sampling parameters, workload specs,
trace lines) is checked where it enters, and a refused value raises
``ValueError`` with one message shape::

    {name} must be {allowed}, got {value!r}

so that the error names the parameter, says what is allowed and shows what
was given. :func:`require` raises that message when a condition fails;
:func:`one_of` checks a mode against its allowed tuple (the ones of
:mod:`kvpage.modes`, built from the ``Literal`` aliases) and returns the
value typed as that mode.

The predicates refuse ``bool`` where a number is wanted: ``True`` is an
``int`` to Python, but ``True`` as a count or a rate is a bug, not a 1.
:func:`is_positive_number` also refuses ``inf`` and ``nan``, which would turn
into zero or nan downstream.

Pure Python, imports nothing of kvpage: the torch-free planner uses it too.
"""

from __future__ import annotations

import math
from typing import TypeGuard, TypeVar

T = TypeVar("T")


def require(ok: bool, name: str, value: object, allowed: str) -> None:
    """Raise ``ValueError("{name} must be {allowed}, got {value!r}")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def one_of(name: str, value: object, allowed: tuple[T, ...]) -> T:
    """``value`` as the element of ``allowed`` it equals; ``ValueError`` naming ``allowed`` if none."""
    require(value in allowed, name, value, f"one of {allowed}")
    return allowed[allowed.index(value)]


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """An ``int`` or ``float`` and not a ``bool`` (``inf`` and ``nan`` pass)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_positive_number(value: object) -> TypeGuard[int | float]:
    """A finite number > 0 (not a ``bool``)."""
    return is_number(value) and math.isfinite(value) and value > 0


def check_tensor_parallel(size: int, heads: int, kv_heads: int, intermediate_size: int) -> None:
    """Refuse a ``tensor_parallel_size`` a model's heads or MLP cannot be split by (the engine and the planner)."""
    where = f"tensor_parallel_size={size}"
    if heads % size:
        raise ValueError(f"{where} must divide the model's num_attention_heads={heads}")
    if kv_heads % size and size % kv_heads:
        raise ValueError(f"{where} must divide the model's num_key_value_heads={kv_heads} or be a multiple of it")
    if intermediate_size % size:
        raise ValueError(f"{where} must divide the model's intermediate_size={intermediate_size}")
