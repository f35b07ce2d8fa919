"""Tiny random Hugging Face checkpoints and transformers reference outputs for tests.

:func:`make_checkpoint` writes a small model of one of the supported
architecture variants with ``save_pretrained``; :func:`hf_greedy` and
:func:`hf_logits` run the same checkpoint through transformers on CPU in
float32, which is the ground truth kvpage is compared against.

Default initialization (std 0.02) gives nearly uniform logits, where greedy
decoding is decided by rounding noise.  The weights are therefore re-drawn
with unit-scale activations and a large LM-head gain so that the best token
usually wins by a wide margin and the generated text varies with the prompt.
The weights depend only on ``seed`` and the tensor shapes, not on other
config fields: a checkpoint rebuilt with a different ``eos_token_id`` has
identical weights, which lets a test pick as EOS a token it knows the model
will generate.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

__all__ = ["ARCHITECTURES", "hf_greedy", "hf_logits", "make_checkpoint"]

ARCHITECTURES = ("llama", "llama3-rope", "llama-linear-rope", "qwen2", "qwen3", "mistral", "llama-tied")

BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
# Logits get a standard deviation of about this many units.
_LOGIT_SCALE = 16.0
# With tied embeddings a large input embedding in the residual stream makes the
# head predict the current token again; keep it small and scale the final norm.
_TIED_EMBED_STD = 0.1


def _build_config(
    arch: str,
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
    overrides: dict[str, Any],
) -> PreTrainedConfig:
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": None,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    if arch == "llama":
        fields["rope_theta"] = 10000.0
    elif arch == "llama3-rope":
        fields["rope_theta"] = 500000.0
        fields["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": max(max_position_embeddings // 4, 8),
        }
    elif arch == "llama-linear-rope":
        fields["rope_theta"] = 10000.0
        fields["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    elif arch == "llama-tied":
        fields["tie_word_embeddings"] = True
    elif arch == "qwen2":
        fields["rope_theta"] = 1000000.0
    elif arch == "qwen3":
        # Real Qwen3 models have head_dim * heads != hidden_size; so does this one.
        fields["head_dim"] = 2 * hidden_size // num_heads
        fields["rope_theta"] = 1000000.0
    elif arch == "mistral":
        fields["sliding_window"] = None
    else:
        raise ValueError(f"arch {arch!r} is not one of {ARCHITECTURES}")
    fields.update(overrides)
    if arch == "qwen2":
        return Qwen2Config(**fields)
    if arch == "qwen3":
        return Qwen3Config(**fields)
    if arch == "mistral":
        return MistralConfig(**fields)
    return LlamaConfig(**fields)


def _randomize_weights(model: PreTrainedModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tied = bool(model.config.tie_word_embeddings)
    hidden_size = model.config.hidden_size
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name == "model.norm.weight" and tied:
                gain = _LOGIT_SCALE / (_TIED_EMBED_STD * math.sqrt(hidden_size))
                parameter.copy_(gain * (1.0 + 0.2 * noise))
            elif name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.5 * noise)
            elif name.endswith("embed_tokens.weight"):
                parameter.copy_(noise * (_TIED_EMBED_STD if tied else 1.0))
            elif name == "lm_head.weight":
                parameter.copy_(noise * _LOGIT_SCALE / math.sqrt(parameter.shape[1]))
            else:
                # q/k get a larger gain so attention patterns are sharp, not uniform.
                gain = 2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                parameter.copy_(noise * gain / math.sqrt(parameter.shape[1]))


def make_checkpoint(
    directory: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 1024,
    max_shard_size: str | int | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random float32 checkpoint of ``arch`` into ``directory`` and return it.

    ``config_overrides`` are passed to the transformers config class (for
    example ``eos_token_id=7`` or ``sliding_window=16``).  ``max_shard_size``
    splits the safetensors file into shards with an index.
    """
    config = _build_config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        overrides=config_overrides,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_weights(model, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if max_shard_size is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


def _config_stamp(model_dir: Path) -> tuple[str, int]:
    config_path = Path(model_dir).resolve() / "config.json"
    return str(config_path.parent), config_path.stat().st_mtime_ns


@functools.lru_cache(maxsize=16)
def _load_hf_model(model_dir: str, config_mtime_ns: int) -> PreTrainedModel:
    # The mtime is part of the key so that a rewritten checkpoint is reloaded.
    del config_mtime_ns
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int, *, ignore_eos: bool = True) -> list[int]:
    """Greedy continuation by transformers; returns only the generated ids.

    With ``ignore_eos`` exactly ``max_new_tokens`` ids are produced (EOS may be
    among them); otherwise generation stops after the first EOS, which is
    included.
    """
    model = _load_hf_model(*_config_stamp(model_dir))
    eos = None if ignore_eos else model.config.eos_token_id
    generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0
    )
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    # generate() fills every field left at None from model.generation_config, so
    # an explicit "no EOS" only holds while the model's own defaults have none.
    model_defaults = model.generation_config
    model.generation_config = GenerationConfig(pad_token_id=0)
    try:
        with torch.no_grad():
            # generate() comes from GenerationMixin, which PreTrainedModel's stubs do not show.
            output = model.generate(  # type: ignore[operator]
                input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation_config
            )
    finally:
        model.generation_config = model_defaults
    return output[0, len(prompt_ids) :].tolist()


def hf_logits(model_dir: Path, input_ids: list[int]) -> torch.Tensor:
    """Float32 logits ``[len(input_ids), vocab]`` of one forward pass over ``input_ids``."""
    model = _load_hf_model(*_config_stamp(model_dir))
    with torch.no_grad():
        output = model(torch.tensor([input_ids], dtype=torch.long))
    return output.logits[0].float()
