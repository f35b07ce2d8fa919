"""The validation helpers, and that every refused option names itself, its value and what is allowed."""

from __future__ import annotations

import ast
import inspect
import math
from collections.abc import Callable
from typing import get_args, get_origin, get_type_hints

import pytest

from kvpage import config, modes
from kvpage.config import CacheConfig, EngineConfig, LoadConfig, SchedulerConfig
from kvpage.sampling_params import SamplingParams
from kvpage.validation import is_int, is_number, is_positive_number, one_of, require
from kvpage.workloads import WORKLOAD_NAMES, WorkloadSpec


def test_helpers() -> None:
    require(True, "x", 1, "anything")
    with pytest.raises(ValueError, match=r"^x must be an integer, got 'a'$"):
        require(False, "x", "a", "an integer")
    assert one_of("kv_layout", "paged", modes.KV_LAYOUTS) == "paged"
    with pytest.raises(ValueError, match=r"^mode must be one of \('a', 'b'\), got 'c'$"):
        one_of("mode", "c", ("a", "b"))
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(2.5) and is_number(-1) and not is_number(False) and not is_number("1")
    assert is_positive_number(0.1) and not is_positive_number(0) and not is_positive_number(math.inf)
    assert not is_positive_number(math.nan) and not is_positive_number(True)


MODE_FIELDS = [(klass, name) for klass in (LoadConfig, CacheConfig, SchedulerConfig)
               for name, hint in get_type_hints(klass).items() if get_origin(hint) is not None
               and all(isinstance(arg, str) for arg in get_args(hint))]


def test_every_mode_field_is_a_literal_of_kvpage_modes() -> None:
    assert {name for _, name in MODE_FIELDS} == {"dtype", "attention_backend", "kv_layout", "preemption_mode",
                                                 "headroom_policy", "prefix_caching_hash_algo", "kv_cache_dtype"}
    for klass, name in MODE_FIELDS:
        assert get_type_hints(klass)[name] in (modes.DType, modes.AttentionBackend, modes.KVLayout,
                                               modes.PreemptionMode, modes.HeadroomPolicy, modes.PrefixHash,
                                               modes.KVCacheDtype)


@pytest.mark.parametrize(("klass", "name"), MODE_FIELDS, ids=[name for _, name in MODE_FIELDS])
def test_a_bad_mode_lists_the_literal_values(klass: type, name: str) -> None:
    allowed = get_args(get_type_hints(klass)[name])
    with pytest.raises(ValueError) as info:
        EngineConfig.from_kwargs(**{name: "sideways"})
    assert str(info.value) == f"{name} must be one of {allowed}, got 'sideways'"


def test_the_mode_tuples_are_those_of_kvpage_modes() -> None:
    assert config.KV_LAYOUTS is modes.KV_LAYOUTS == get_args(modes.KVLayout)
    assert config.HEADROOM_POLICIES is modes.HEADROOM_POLICIES == get_args(modes.HeadroomPolicy)
    assert config.PREEMPTION_MODES is modes.PREEMPTION_MODES == get_args(modes.PreemptionMode)
    assert config.ATTENTION_BACKENDS is modes.ATTENTION_BACKENDS == get_args(modes.AttentionBackend)
    assert config.DTYPES is modes.DTYPES == get_args(modes.DType)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: LoadConfig(seed=1.5).validate(),  # type: ignore[arg-type]
     "seed must be an integer, got 1.5"),
    (lambda: LoadConfig(device="tpu").validate(),
     "device must be one of ('auto', 'cpu', 'cuda') or 'cuda:N', got 'tpu'"),
    (lambda: CacheConfig(swap_space=-1).validate(), "swap_space must be a number of GiB >= 0, got -1"),
    (lambda: SchedulerConfig(watermark=True).validate(), "watermark must be a number in [0, 1), got True"),
    (lambda: SamplingParams(early_stopping="sometimes"),  # type: ignore[arg-type]
     "early_stopping must be True, False or 'never', got 'sometimes'"),
    (lambda: SamplingParams(top_p=0), "top_p must be a number in (0, 1], got 0"),
    (lambda: WorkloadSpec(name="sharegtp"), f"name must be one of {WORKLOAD_NAMES}, got 'sharegtp'"),
    (lambda: WorkloadSpec(name="alpaca", burstiness=math.inf), "burstiness must be a finite number > 0, got inf"),
])
def test_one_bad_value_per_part(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == message


def test_every_config_field_has_a_docstring() -> None:
    tree = ast.parse(inspect.getsource(config))
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name.endswith("Config")]
    assert {c.name for c in classes} == {"LoadConfig", "CacheConfig", "SchedulerConfig", "ParallelConfig",
                                         "EngineConfig"}
    for klass in classes:
        body = klass.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                after = body[i + 1] if i + 1 < len(body) else None
                assert (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)), f"{klass.name}.{ast.unparse(node.target)}"
