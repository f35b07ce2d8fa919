"""kvpage's CausalLM must reproduce transformers' logits for every supported variant.

Models run the way the engine drives them: new tokens of several sequences
flattened into one step, K/V in a paged cache whose physical pages are
shuffled (and whose unused slots hold NaN), prefill, chunked prefill and
decode mixed in one batch.  The reference is a single full-sequence forward
pass of the transformers model in float32.
"""

from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvpage.model import ModelConfig, load_model, random_model_dir, resolve_dtype
from kvpage.model.config import parse_rope_config
from tests.checkpoints import ARCHITECTURES, hf_greedy, hf_logits, make_checkpoint
from tests.paged_runner import BLOCK_SIZE, PagedRunner


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 512, (length - 1,), generator=generator).tolist()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


def _assert_prefill_then_decode_matches(model_dir: Path, prompt_len: int = 21, decode_steps: int = 8) -> None:
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    prompt = _prompt(prompt_len, seed=1)
    generated = hf_greedy(model_dir, prompt, decode_steps)
    expected = hf_logits(model_dir, prompt + generated)

    runner = PagedRunner(model)
    actual = [runner.step({0: prompt})[0]]
    for token in generated[:-1]:
        actual.append(runner.step({0: [token]})[0])
    logits = torch.cat(actual)
    assert _relative_error(logits, expected[:-1]) < 1e-4
    assert logits[prompt_len - 1 :].argmax(-1).tolist() == generated


def test_prefill_then_decode_matches_hf(checkpoint: Path) -> None:
    _assert_prefill_then_decode_matches(checkpoint)


def test_chunked_prefill_in_mixed_batch_matches_hf(checkpoint: Path) -> None:
    model = load_model(checkpoint, torch.float32, torch.device("cpu"))
    chunked, decoding = _prompt(30, seed=2), _prompt(9, seed=3)
    decoding_full = decoding + hf_greedy(checkpoint, decoding, 3)
    runner = PagedRunner(model, seed=5)
    # Sequence 0 arrives in three chunks while sequence 1 prefills, then decodes.
    first = runner.step({0: chunked[:7], 1: decoding})
    second = runner.step({1: [decoding_full[9]], 0: chunked[7:20]})
    third = runner.step({0: chunked[20:], 1: [decoding_full[10]]})
    chunked_logits = torch.cat([first[0], second[0], third[0]])
    decoding_logits = torch.cat([first[1], second[1], third[1]])
    assert _relative_error(chunked_logits, hf_logits(checkpoint, chunked)) < 1e-4
    assert _relative_error(decoding_logits, hf_logits(checkpoint, decoding_full)[:11]) < 1e-4
    assert decoding_logits[-3:].argmax(-1).tolist() == decoding_full[9:]


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("mistral", {"sliding_window": 6}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
    ],
    ids=["mistral-sliding", "qwen2-sliding", "yarn", "dynamic", "llama-biases"],
)
def test_variants_match_hf(tmp_path: Path, arch: str, overrides: dict[str, Any]) -> None:
    model_dir = make_checkpoint(tmp_path, arch, **overrides)
    _assert_prefill_then_decode_matches(model_dir, prompt_len=17, decode_steps=6)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    model_dir = make_checkpoint(tmp_path, "qwen2", max_shard_size="40KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    _assert_prefill_then_decode_matches(model_dir, prompt_len=9, decode_steps=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(llama_checkpoint: Path, dtype: torch.dtype) -> None:
    prompt = _prompt(24, seed=4)
    model = load_model(llama_checkpoint, dtype, torch.device("cpu"))
    assert model.dtype == dtype and model.embed_tokens.dtype == dtype
    logits = PagedRunner(model).step({0: prompt})[0]
    expected = hf_logits(llama_checkpoint, prompt)
    assert logits.dtype == torch.float32
    assert _relative_error(logits, expected) < 0.1
    agreement = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement > 0.8


def test_hf_greedy_eos_handling(tmp_path: Path) -> None:
    prompt = _prompt(8, seed=6)
    base = make_checkpoint(tmp_path / "base", "llama")
    tokens = hf_greedy(base, prompt, 10)
    assert len(tokens) == 10
    eos = tokens[3]
    stopping = make_checkpoint(tmp_path / "eos", "llama", eos_token_id=eos)
    assert hf_greedy(stopping, prompt, 10, ignore_eos=True) == tokens
    assert hf_greedy(stopping, prompt, 10, ignore_eos=False) == tokens[: tokens.index(eos) + 1]


def test_missing_directory_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(missing, torch.float32, torch.device("cpu"))


def test_missing_config_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def test_pickle_checkpoint_is_refused(tmp_path: Path, llama_checkpoint: Path) -> None:
    shutil.copy(llama_checkpoint / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def test_unsupported_architecture_raises(tmp_path: Path, llama_checkpoint: Path) -> None:
    config = json.loads((llama_checkpoint / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("change", ["missing", "unexpected", "wrong_shape"])
def test_weight_mismatch_raises(tmp_path: Path, llama_checkpoint: Path, change: str) -> None:
    shutil.copy(llama_checkpoint / "config.json", tmp_path / "config.json")
    tensors = load_file(str(llama_checkpoint / "model.safetensors"))
    if change == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
        message = "missing weights \\[model.layers.1.mlp.up_proj.weight\\]"
    elif change == "unexpected":
        tensors["model.layers.0.extra.weight"] = torch.zeros(2)
        message = "unexpected weights \\[model.layers.0.extra.weight\\]"
    else:
        tensors["model.norm.weight"] = torch.zeros(3)
        message = "model.norm.weight.*shape"
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def test_an_fp8_kv_checkpoints_cache_scales_are_set_aside(tmp_path: Path, llama_checkpoint: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """vLLM's FP8-KV checkpoints ship ``self_attn.k_scale``/``v_scale``: they load, and nothing uses them."""
    from kvpage import LLM, SamplingParams

    target = shutil.copytree(llama_checkpoint, tmp_path / "fp8-kv")
    tensors = load_file(str(llama_checkpoint / "model.safetensors"))
    num_layers = ModelConfig.from_model_dir(llama_checkpoint).num_layers
    for layer in range(num_layers):  # a scale far from kvpage's own, so that using it would show
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor([1e-3])
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor([1e3])
    save_file(tensors, str(target / "model.safetensors"))
    with caplog.at_level("INFO", logger="kvpage.model.loader"):
        scaled = load_model(target, torch.float32, torch.device("cpu"))
    assert f"set aside the {2 * num_layers} KV-cache scales" in caplog.text
    plain = load_model(llama_checkpoint, torch.float32, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(scaled.state_dict().values(), plain.state_dict().values()))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 9, 14, 3, 7]}
    outputs = [LLM(model=str(d), kv_cache_dtype="fp8", num_kv_blocks=16).generate(prompt, params, use_tqdm=False)
               for d in (target, llama_checkpoint)]
    assert outputs[0][0].outputs[0].token_ids == outputs[1][0].outputs[0].token_ids


def test_quantized_weights_are_refused_by_name(tmp_path: Path, llama_checkpoint: Path) -> None:
    shutil.copy(llama_checkpoint / "config.json", tmp_path / "config.json")
    tensors = load_file(str(llama_checkpoint / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="quantized weights .*q_proj.weight_scale.*dequantize the checkpoint"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))


def test_config_rejects_unsupported_settings(llama_checkpoint: Path) -> None:
    raw = json.loads((llama_checkpoint / "config.json").read_text())
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        ModelConfig.from_dict({**raw, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_type 'longrope'.*llama3"):
        ModelConfig.from_dict({**raw, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelConfig.from_dict({**raw, "num_hidden_layers": 0})


def test_legacy_rope_dialect_matches_new() -> None:
    new = parse_rope_config(
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}, 4096
    )
    legacy = parse_rope_config({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}, 4096)
    assert new == legacy and new.rope_type == "linear" and new.theta == 5e5
    llama3 = parse_rope_config(
        {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
        131072,
    )
    assert llama3.original_max_position_embeddings == 8192 and llama3.factor == 8.0
    assert parse_rope_config({"rope_scaling": None}, 2048).rope_type == "default"


def test_config_fields(checkpoint: Path) -> None:
    config = ModelConfig.from_model_dir(checkpoint)
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)
    assert config.torch_dtype == torch.float32
    assert config.num_layers == 2 and config.num_kv_heads == 2
    assert config.qk_norm == (config.architecture == "Qwen3ForCausalLM")
    assert config.attention_bias == (config.architecture == "Qwen2ForCausalLM")


def test_resolve_dtype(llama_checkpoint: Path) -> None:
    config = ModelConfig.from_model_dir(llama_checkpoint)
    bf16_config = ModelConfig.from_dict({**json.loads((llama_checkpoint / "config.json").read_text()),
                                         "dtype": "bfloat16"})
    assert resolve_dtype("auto", bf16_config, "cpu") == torch.float32
    assert resolve_dtype("auto", bf16_config, torch.device("cuda")) == torch.bfloat16
    fp16_config = ModelConfig.from_dict({**json.loads((llama_checkpoint / "config.json").read_text()),
                                         "dtype": "float16"})
    assert resolve_dtype("auto", fp16_config, torch.device("cuda")) == torch.float16
    # A float32 checkpoint serves in bfloat16 on a GPU, float32 on a CPU.
    assert config.torch_dtype == torch.float32
    assert resolve_dtype("auto", config, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", config, "cpu") == torch.float32
    assert resolve_dtype("float16", config, "cpu") == torch.float16
    assert resolve_dtype(torch.bfloat16, config, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="'int8'.*'auto'"):
        resolve_dtype("int8", config, "cpu")


def test_default_model_loads_and_tokenizes(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model_dir = random_model_dir(tmp_path)
    assert random_model_dir(tmp_path) == model_dir
    model = load_model(model_dir, "auto", "cpu")
    assert model.config.architecture == "LlamaForCausalLM" and model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "Paged attention, héhé 日本 \n\t!"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == model.config.bos_token_id
    assert ids[1:] == list(text.encode("utf-8"))
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token_id in model.config.eos_token_ids
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert "hi" in chat
    logits = PagedRunner(model, num_pages=math.ceil(len(ids) / BLOCK_SIZE)).step({0: ids})[0]
    assert logits.shape == (len(ids), model.config.vocab_size) and torch.isfinite(logits).all()


def test_default_model_build_race(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        directories = list(pool.map(lambda _: random_model_dir(tmp_path), range(3)))
    assert len(set(directories)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random-v1"]  # no staging dirs left
    load_model(directories[0], "auto", "cpu")


def test_generation_config_eos_ids_are_merged(tmp_path: Path, llama_checkpoint: Path) -> None:
    shutil.copy(llama_checkpoint / "config.json", tmp_path / "config.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    assert ModelConfig.from_model_dir(tmp_path).eos_token_ids == (2, 7, 9)


def test_default_model_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPAGE_CACHE_DIR", str(tmp_path))
    assert random_model_dir() == tmp_path / "random-v1"
