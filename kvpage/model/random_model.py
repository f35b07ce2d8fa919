"""A tiny random-weight Llama checkpoint, built locally on demand.

Tests and benchmarks need a model of any shape with no download and no
training.  :func:`random_model_dir` writes an ordinary Hugging Face
checkpoint (``config.json``, ``model.safetensors`` and a byte-level
tokenizer) into a cache directory the first time it is called and reuses it
afterwards, so it goes through exactly the same loading path as a real
model.  Its output is meaningless text; the model users get by default is
the trained demo model (:mod:`kvpage.model.demo_model`).

Weights come from a fixed seed, so every machine builds the same model.  The
checkpoint is assembled in a temporary directory and moved into place with
one atomic rename, so concurrent builders never expose a half-written
directory; the loser of a race simply discards its copy.

The tokenizer maps byte ``b`` to token id ``b`` (ids 0..255) and adds
``<s>`` (256, beginning of sequence) and ``</s>`` (257, end of sequence), so
any text round-trips exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["RandomModelSpec", "RANDOM_MODEL_SPEC", "build_random_model", "random_model_dir"]

_CACHE_ENV_VAR = "KVPAGE_CACHE_DIR"
_COMPLETE_MARKER = ".kvpage-complete"
_BOS_TOKEN = "<s>"
_EOS_TOKEN = "</s>"
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class RandomModelSpec:
    """Shape and identity of a random test model."""

    name: str = "random-v1"
    seed: int = 20240601
    num_layers: int = 4
    hidden_size: int = 256
    intermediate_size: int = 688
    num_heads: int = 8
    num_kv_heads: int = 4
    max_position_embeddings: int = 2048
    num_byte_tokens: int = 256

    @property
    def bos_token_id(self) -> int:
        return self.num_byte_tokens

    @property
    def eos_token_id(self) -> int:
        return self.num_byte_tokens + 1

    @property
    def vocab_size(self) -> int:
        return self.num_byte_tokens + 2


RANDOM_MODEL_SPEC = RandomModelSpec()


def random_model_dir(cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the random checkpoint, building it on first use.

    The cache root is ``cache_root``, else ``$KVPAGE_CACHE_DIR``, else
    ``~/.cache/kvpage``; the model lives in ``<root>/random-v1``.
    """
    spec = RANDOM_MODEL_SPEC
    if cache_root is None:
        cache_root = os.environ.get(_CACHE_ENV_VAR) or Path.home() / ".cache" / "kvpage"
    root = Path(cache_root).expanduser()
    target = root / spec.name
    if (target / _COMPLETE_MARKER).is_file():
        return target
    if target.exists():
        raise ValueError(
            f"{str(target)!r} exists but is not a complete kvpage random model; "
            "delete it so that it can be rebuilt"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    try:
        build_random_model(staging, spec)
        (staging / _COMPLETE_MARKER).write_text(spec.name + "\n", encoding="utf-8")
        try:
            os.replace(staging, target)
        except OSError:
            # Another process renamed its finished copy into place first.
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def build_random_model(directory: Path, spec: RandomModelSpec = RANDOM_MODEL_SPEC) -> None:
    """Write config, random weights and tokenizer of ``spec`` into an existing directory."""
    _write_config(directory, spec)
    _write_weights(directory, spec)
    _write_tokenizer(directory, spec)


def _write_config(directory: Path, spec: RandomModelSpec) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.hidden_size // spec.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "torch_dtype": "bfloat16",
    }
    with open(directory / "config.json", "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)


def _write_weights(directory: Path, spec: RandomModelSpec) -> None:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(spec.seed)
    head_dim = spec.hidden_size // spec.num_heads

    def matrix(rows: int, columns: int, gain: float = 1.0) -> torch.Tensor:
        # Unit-variance activations keep the random model's predictions peaked.
        std = gain / columns**0.5
        return (torch.randn(rows, columns, generator=generator) * std).to(torch.bfloat16)

    def norm_weight(size: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(size, generator=generator)).to(torch.bfloat16)

    hidden, inner = spec.hidden_size, spec.intermediate_size
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": matrix(spec.vocab_size, hidden, gain=hidden**0.5),
        "model.norm.weight": norm_weight(hidden),
        "lm_head.weight": matrix(spec.vocab_size, hidden, gain=4.0),
    }
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "input_layernorm.weight"] = norm_weight(hidden)
        tensors[prefix + "post_attention_layernorm.weight"] = norm_weight(hidden)
        tensors[prefix + "self_attn.q_proj.weight"] = matrix(spec.num_heads * head_dim, hidden, gain=2.0)
        tensors[prefix + "self_attn.k_proj.weight"] = matrix(spec.num_kv_heads * head_dim, hidden, gain=2.0)
        tensors[prefix + "self_attn.v_proj.weight"] = matrix(spec.num_kv_heads * head_dim, hidden)
        tensors[prefix + "self_attn.o_proj.weight"] = matrix(hidden, spec.num_heads * head_dim)
        tensors[prefix + "mlp.gate_proj.weight"] = matrix(inner, hidden)
        tensors[prefix + "mlp.up_proj.weight"] = matrix(inner, hidden)
        tensors[prefix + "mlp.down_proj.weight"] = matrix(hidden, inner)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def byte_to_printable() -> dict[int, str]:
    """Byte-level BPE alphabet: a printable, non-whitespace character for every byte.

    Printable ASCII and Latin-1 bytes stand for themselves; the rest are
    shifted past U+0100 in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return mapping


def _write_tokenizer(directory: Path, spec: RandomModelSpec) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in byte_to_printable().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: without merges, splitting into words would change nothing.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([_BOS_TOKEN, _EOS_TOKEN])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{_BOS_TOKEN} $A",
        pair=f"{_BOS_TOKEN} $A $B",
        special_tokens=[(_BOS_TOKEN, spec.bos_token_id), (_EOS_TOKEN, spec.eos_token_id)],
    )
    if tokenizer.token_to_id(_BOS_TOKEN) != spec.bos_token_id or tokenizer.token_to_id(_EOS_TOKEN) != spec.eos_token_id:
        raise RuntimeError("special token ids of the random model's tokenizer do not match its config")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=_BOS_TOKEN,
        eos_token=_EOS_TOKEN,
        chat_template=_CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )
    wrapped.save_pretrained(str(directory))
    _make_tokenizer_config_portable(directory)


def _make_tokenizer_config_portable(directory: Path) -> None:
    """Keep the chat template inside tokenizer_config.json under a class name all versions know.

    transformers 5 writes the template to a separate ``chat_template.jinja``
    and names its own tokenizer class, which transformers 4 cannot load.
    """
    config_path = directory / "tokenizer_config.json"
    with open(config_path, encoding="utf-8") as handle:
        tokenizer_config = json.load(handle)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["chat_template"] = _CHAT_TEMPLATE
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(tokenizer_config, handle, indent=2)
    (directory / "chat_template.jinja").unlink(missing_ok=True)
