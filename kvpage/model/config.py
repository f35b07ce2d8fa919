"""Model configuration: the subset of a Hugging Face ``config.json`` kvpage needs.

All supported architectures are Llama-shaped decoders (RMSNorm, rotary
position embeddings, grouped-query attention, SiLU-gated MLP).  They differ
only in small switches, which :class:`ModelConfig` records explicitly:
bias on the q/k/v projections (Qwen2), per-head RMSNorm of q and k (Qwen3),
sliding-window attention (Mistral, optional in Qwen), and RoPE scaling.

Configs on disk come in two dialects.  transformers 4.x writes ``rope_theta``
plus an optional ``rope_scaling`` dict (whose type key is ``rope_type`` or the
older ``type``); transformers 5.x writes a single ``rope_parameters`` dict that
also holds ``rope_theta``.  :func:`parse_rope_config` accepts both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "ModelConfig",
    "RopeConfig",
    "parse_rope_config",
]

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

# Older configs sometimes omit "architectures"; model_type identifies them as well.
_ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_DTYPE_BY_NAME = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalized across config dialects.

    ``factor`` and the llama3/yarn fields are only meaningful for the rope
    types that use them.
    """

    rope_type: str = "default"
    theta: float = _DEFAULT_ROPE_THETA
    factor: float = 1.0
    # llama3 frequency-band interpolation
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn ramp and attention temperature
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a supported causal LM."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    attention_output_bias: bool = False  # bias on o_proj (Llama/Qwen3 attention_bias covers it too)
    mlp_bias: bool = False
    qk_norm: bool = False
    # One entry per layer; None means full causal attention.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries, expected "
                f"num_layers={self.num_layers}"
            )

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> ModelConfig:
        """Read ``config.json`` of a checkpoint directory.

        End-of-sequence ids from ``generation_config.json`` are added to the
        config's: chat models often stop on a token (Llama 3's
        ``<|eot_id|>``) that only the generation config lists.
        """
        config_path = Path(model_dir) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"model_dir {str(model_dir)!r} has no config.json; expected a Hugging Face "
                f"checkpoint directory (looked for {str(config_path)!r})"
            )
        config = cls.from_dict(_read_json_object(config_path))
        generation_path = Path(model_dir) / "generation_config.json"
        if generation_path.is_file():
            extra_eos = parse_token_ids(_read_json_object(generation_path).get("eos_token_id"))
            merged = config.eos_token_ids + tuple(t for t in extra_eos if t not in config.eos_token_ids)
            config = dataclasses.replace(config, eos_token_ids=merged)
        return config

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Parse a Hugging Face config dict, rejecting anything kvpage cannot run exactly."""
        architecture = _parse_architecture(raw)
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r} is not supported; only 'silu' is")
        if raw.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"partial_rotary_factor={raw['partial_rotary_factor']!r} is not supported; only 1.0 is"
            )
        hidden_size = _require_int(raw, "hidden_size")
        num_attention_heads = _require_int(raw, "num_attention_heads")
        num_layers = _require_int(raw, "num_hidden_layers")
        num_kv_heads = raw.get("num_key_value_heads") or num_attention_heads
        head_dim = raw.get("head_dim")
        if head_dim is None:
            # Qwen3Config's own default differs from hidden/heads.
            head_dim = 128 if architecture == "Qwen3ForCausalLM" else hidden_size // num_attention_heads
        max_positions = int(raw.get("max_position_embeddings", 2048))

        is_qwen2 = architecture == "Qwen2ForCausalLM"
        is_mistral = architecture == "MistralForCausalLM"
        configured_bias = bool(raw.get("attention_bias", False)) and not is_mistral
        return cls(
            architecture=architecture,
            vocab_size=_require_int(raw, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_require_int(raw, "intermediate_size"),
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            num_kv_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=parse_rope_config(raw, max_positions),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=is_qwen2 or configured_bias,
            attention_output_bias=configured_bias and not is_qwen2,
            mlp_bias=bool(raw.get("mlp_bias", False)) and architecture == "LlamaForCausalLM",
            qk_norm=architecture == "Qwen3ForCausalLM",
            sliding_windows=_parse_sliding_windows(raw, architecture, num_layers, max_positions),
            bos_token_id=None if raw.get("bos_token_id") is None else int(raw["bos_token_id"]),
            eos_token_ids=parse_token_ids(raw.get("eos_token_id")),
            torch_dtype=_parse_dtype(raw),
        )


def _read_json_object(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        raw = json.load(handle)
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(raw).__name__}")
    return raw


def parse_token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(t) for t in value) if isinstance(value, list) else (int(value),)


def _require_int(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config field {key!r} must be a positive integer, got {value!r}")
    return value


def _parse_architecture(raw: Mapping[str, Any]) -> str:
    architectures = raw.get("architectures") or []
    if not architectures and raw.get("model_type") in _ARCHITECTURE_BY_MODEL_TYPE:
        architectures = [_ARCHITECTURE_BY_MODEL_TYPE[raw["model_type"]]]
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        found = architectures or raw.get("model_type")
        raise ValueError(
            f"architecture {found!r} is not supported; supported architectures are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return str(architectures[0])


def _parse_dtype(raw: Mapping[str, Any]) -> torch.dtype:
    # transformers 5.x writes "dtype", 4.x "torch_dtype".
    name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    if name not in _DTYPE_BY_NAME:
        raise ValueError(f"config dtype {name!r} is not supported; allowed: {sorted(_DTYPE_BY_NAME)}")
    return _DTYPE_BY_NAME[name]


def _parse_sliding_windows(
    raw: Mapping[str, Any], architecture: str, num_layers: int, max_positions: int
) -> tuple[int | None, ...]:
    if architecture == "MistralForCausalLM":
        window = raw.get("sliding_window")
        windowed = [True] * num_layers
    elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and raw.get("use_sliding_window"):
        window = raw.get("sliding_window")
        layer_types = raw.get("layer_types")
        if layer_types is None:
            first_windowed = int(raw.get("max_window_layers", num_layers))
            windowed = [layer >= first_windowed for layer in range(num_layers)]
        else:
            windowed = [kind == "sliding_attention" for kind in layer_types]
    else:
        return (None,) * num_layers
    if window is None or window >= max_positions:
        # A window no shorter than the longest sequence never masks anything.
        return (None,) * num_layers
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"config field 'sliding_window' must be a positive integer, got {window!r}")
    if len(windowed) != num_layers:
        raise ValueError(f"layer_types has {len(windowed)} entries, expected num_hidden_layers={num_layers}")
    return tuple(window if is_windowed else None for is_windowed in windowed)


def parse_rope_config(raw: Mapping[str, Any], max_position_embeddings: int) -> RopeConfig:
    """Normalize ``rope_parameters`` (5.x) or ``rope_theta`` + ``rope_scaling`` (4.x)."""
    parameters: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    parameters.update(raw.get("rope_scaling") or {})
    if "rope_type" not in parameters and "type" in parameters:
        parameters["rope_type"] = parameters["type"]
    rope_type = parameters.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; supported rope types are "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = parameters.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial!r} is not supported; only 1.0 is")
    theta = parameters.get("rope_theta") or raw.get("rope_theta") or _DEFAULT_ROPE_THETA
    factor = parameters.get("factor")
    if factor is None and rope_type in ("linear", "dynamic", "llama3"):
        raise ValueError(f"rope_type {rope_type!r} needs a 'factor' in the rope parameters")

    original_max: int | None = parameters.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn"):
        # As in transformers, a top-level value wins and the context length is the fallback.
        original_max = int(
            raw.get("original_max_position_embeddings") or original_max or max_position_embeddings
        )
        if factor is None:
            factor = max_position_embeddings / original_max

    def optional_float(key: str) -> float | None:
        return None if parameters.get(key) is None else float(parameters[key])

    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=1.0 if factor is None else float(factor),
        low_freq_factor=float(parameters.get("low_freq_factor", 1.0)),
        high_freq_factor=float(parameters.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=None if original_max is None else int(original_max),
        beta_fast=float(parameters.get("beta_fast") or 32.0),
        beta_slow=float(parameters.get("beta_slow") or 1.0),
        attention_factor=optional_float("attention_factor"),
        mscale=optional_float("mscale"),
        mscale_all_dim=optional_float("mscale_all_dim"),
        truncate=bool(parameters.get("truncate", True)),
    )
