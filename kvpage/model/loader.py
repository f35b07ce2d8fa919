"""Loading Hugging Face checkpoints into :class:`~kvpage.model.llama.CausalLM`.

A checkpoint directory holds ``config.json`` and the weights as safetensors,
either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``.  Pickle-based ``pytorch_model.bin`` files
are never loaded because unpickling can execute arbitrary code.

Loading is strict: every weight the model needs must be present exactly once
with the expected shape, and any tensor the model would silently ignore is an
error, because either case means the checkpoint is not what the config
claims.  Tensors are converted to the requested dtype while being copied
into the (uninitialized) model parameters, one tensor at a time, so peak host
memory stays near one tensor rather than the whole checkpoint.

Two kinds of tensor are recognised rather than refused as unexpected. The
KV-cache scales that FP8-KV checkpoints ship (``self_attn.k_scale`` and
``v_scale``, one a layer or a KV head, for engines with one scale a tensor)
are set aside: kvpage's 8-bit pages carry their own scale a token and head,
computed as K/V are stored, which measured better than a calibrated scale a
layer and head (docs/benchmarks.md, "scale granularity").  The scales of
quantized weights (``weight_scale``, ...) are refused with a message that
says so: kvpage runs dense weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from kvpage.model.config import ModelConfig
from kvpage.model.llama import CausalLM, CheckpointSlice
from kvpage.ops.collectives import TPGroup

__all__ = ["SUPPORTED_DTYPES", "find_safetensors_files", "load_model", "load_model_from_tensors", "resolve_dtype"]

SUPPORTED_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_SHARD_INDEX_NAME = "model.safetensors.index.json"
# Buffers some older exports saved alongside the weights; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# FP8-KV checkpoints' cache scales (vLLM's names, llm-compressor's and AutoFP8's older ones): set aside.
_KV_SCALE_SUFFIXES = ("self_attn.k_scale", "self_attn.v_scale", "self_attn.kv_scale", "self_attn.q_scale",
                      "self_attn.prob_scale", "k_proj.output_scale", "v_proj.output_scale")
# What quantized weights come with (FP8, INT8, GPTQ/AWQ-style packed or grouped weights).
_WEIGHT_QUANT_SUFFIXES = (".weight_scale", ".input_scale", ".weight_zero_point", ".weight_packed",
                          ".weight_shape", ".qweight", ".qzeros", ".scales", ".g_idx")

logger = logging.getLogger(__name__)


def resolve_dtype(
    name_or_dtype: str | torch.dtype, config: ModelConfig, device: torch.device | str
) -> torch.dtype:
    """Turn a user dtype choice into a torch dtype.

    ``"auto"`` means float32 on CPU (where half precision is slow and only
    approximately matches references); on a GPU, the checkpoint's own half
    precision dtype, and bfloat16 for float32 checkpoints (as vLLM does:
    float32 would halve the KV cache and the speed for no visible gain).
    """
    if isinstance(name_or_dtype, torch.dtype):
        if name_or_dtype not in SUPPORTED_DTYPES.values():
            raise ValueError(
                f"dtype {name_or_dtype} is not supported; allowed: {', '.join(SUPPORTED_DTYPES)}"
            )
        return name_or_dtype
    name = _DTYPE_ALIASES.get(name_or_dtype, name_or_dtype)
    if name == "auto":
        if torch.device(device).type == "cpu":
            return torch.float32
        return torch.bfloat16 if config.torch_dtype == torch.float32 else config.torch_dtype
    if name not in SUPPORTED_DTYPES:
        raise ValueError(
            f"dtype {name_or_dtype!r} is not supported; allowed: 'auto', "
            f"{', '.join(repr(n) for n in SUPPORTED_DTYPES)}"
        )
    return SUPPORTED_DTYPES[name]


def find_safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of the index, or every ``*.safetensors``."""
    index_path = model_dir / _SHARD_INDEX_NAME
    if index_path.is_file():
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{str(index_path)!r} has no 'weight_map' naming the shard of each weight")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"shard {str(path)!r} listed in {str(index_path)!r} does not exist")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found {', '.join(others)})" if others else ""
        raise ValueError(
            f"model_dir {str(model_dir)!r} has no *.safetensors weights{found}; "
            "only safetensors checkpoints are supported, pickle checkpoints are never loaded"
        )
    return files


def load_model(
    model_dir: str | os.PathLike[str], dtype: torch.dtype | str, device: torch.device | str,
    tp: TPGroup | None = None,
) -> CausalLM:
    """Build a :class:`CausalLM` from a Hugging Face checkpoint directory (``tp``: this rank's shard of it).

    ``dtype`` may also be a name accepted by :func:`resolve_dtype`, including ``"auto"``.
    """
    directory = Path(model_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"model_dir {str(model_dir)!r} does not exist or is not a directory")
    config = ModelConfig.from_model_dir(directory)
    files = find_safetensors_files(directory)
    model = CausalLM(config, dtype=resolve_dtype(dtype, config, device), device=torch.device(device), tp=tp)
    slices = model.checkpoint_slices()

    seen: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            names = list(reader.keys())
        for name in names:
            if name in seen:
                raise ValueError(f"weight {name!r} appears in both {seen[name].name} and {path.name}")
            seen[name] = path
    loaded = set(_loaded_names(config, slices, list(seen), f"checkpoint in {str(directory)!r}"))
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            for name in reader.keys():
                if name in loaded:
                    _copy_weight(slices[name], name, reader.get_tensor(name), path.name)
    return model


def load_model_from_tensors(
    config: ModelConfig, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str,
    where: str, tp: TPGroup | None = None,
) -> CausalLM:
    """Build a :class:`CausalLM` from tensors in memory under Hugging Face names (a GGUF file's, dequantized
    by transformers), as strictly as :func:`load_model` reads a directory."""
    model = CausalLM(config, dtype=dtype, device=torch.device(device), tp=tp)
    slices = model.checkpoint_slices()
    for name in _loaded_names(config, slices, list(tensors), where):
        _copy_weight(slices[name], name, tensors[name], where)
    return model


def _loaded_names(
    config: ModelConfig, slices: Mapping[str, CheckpointSlice], names: list[str], where: str
) -> list[str]:
    """The checkpoint's names the model loads; raises if a weight is missing or a tensor would be ignored."""
    loaded, unexpected, kv_scales = [], [], []
    for name in names:
        if name in slices:
            loaded.append(name)
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied models use the embedding matrix, as transformers does
        elif name.endswith(_KV_SCALE_SUFFIXES):
            kv_scales.append(name)
        elif not name.endswith(_IGNORED_SUFFIXES):
            unexpected.append(name)
    quantized = sorted(name for name in unexpected if name.endswith(_WEIGHT_QUANT_SUFFIXES))
    if quantized:
        raise ValueError(
            f"{where} holds quantized weights ({_preview(quantized, 3)}): kvpage loads dense float32, bfloat16 "
            "or float16 safetensors, or a GGUF file, which it dequantizes; dequantize the checkpoint first"
        )
    if kv_scales:
        logger.info("set aside the %d KV-cache scales of %s (%s): kvpage's 8-bit KV cache computes a scale a "
                    "token and KV head as it stores K/V", len(kv_scales), where, _preview(sorted(kv_scales), 2))
    missing = sorted(set(slices) - set(loaded))
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match {config.architecture}: "
            f"missing weights {_preview(missing)}; unexpected weights {_preview(sorted(unexpected))}"
        )
    return loaded


def _copy_weight(target: CheckpointSlice, name: str, tensor: torch.Tensor, where: str) -> None:
    expected_shape = target.source_shape()
    if tuple(tensor.shape) != expected_shape:
        raise ValueError(
            f"weight {name!r} in {where} has shape {tuple(tensor.shape)}, expected {expected_shape} for this config"
        )
    target.parameter.data[target.row_start : target.row_start + target.rows].copy_(target.take(tensor))


def _preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return "[]"
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"[{shown}{more}]"
