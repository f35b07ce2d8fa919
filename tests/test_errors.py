"""Bad input gets a clear error, the engine keeps serving, and no page leaks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvpage import LLM, SamplingParams
from kvpage.cli import main
from tests.checkpoints import make_checkpoint

VOCAB = 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("errors") / "llama", "llama", seed=2, vocab_size=VOCAB,
                           max_position_embeddings=128)


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(model=str(model_dir), max_model_len=64)


BAD_REQUESTS = [
    ("", {}, "prompt must not be empty"),
    ({"prompt_token_ids": []}, {}, "non-empty list"),
    ({"prompt_token_ids": [1, VOCAB]}, {}, rf"contains {VOCAB}; token ids must be integers in \[0, {VOCAB}\)"),
    ({"prompt_token_ids": [1, -3]}, {}, "contains -3"),
    ({"prompt_token_ids": [1, 2]}, {"max_tokens": 0}, "max_tokens must be None or an integer >= 1, got 0"),
    ({"prompt_token_ids": [1, 2]}, {"temperature": -0.5}, "temperature must be a number >= 0, got -0.5"),
    ({"prompt_token_ids": [1, 2]}, {"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
    ({"prompt_token_ids": [1, 2]}, {"top_p": 1.5}, "top_p must be"),
    ({"prompt_token_ids": list(range(3, 70))}, {}, "max_model_len is 64"),
    ({"prompt_token_ids": list(range(3, 40))}, {"max_tokens": 40}, r"exceeds max_model_len \(64\)"),
    ({"prompt_token_ids": [1, 2]}, {"stop_token_ids": [VOCAB + 5]}, "stop_token_ids contains"),
]


@pytest.mark.parametrize(("prompt", "params", "message"), BAD_REQUESTS)
def test_bad_request_is_refused_and_others_still_run(llm: LLM, prompt: object, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}, prompt], SamplingParams(**params), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # the good prompt was withdrawn with the batch
    metrics = llm.get_metrics()
    assert metrics["kv_blocks_used"] == 0
    ok = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 5


def test_sampling_params_errors_name_the_parameter() -> None:
    cases = {"n": 0, "top_k": -2, "min_p": 1.5, "presence_penalty": 3, "repetition_penalty": 0,
             "logprobs": 21, "min_tokens": -1, "seed": "x", "stop": [""], "stop_token_ids": [-1]}
    for name, value in cases.items():
        with pytest.raises(ValueError, match=re.escape(f"{name} must be")) as info:
            SamplingParams(**{name: value})
        assert str(info.value).endswith(f"got {value!r}")
        with pytest.raises(ValueError):
            SamplingParams(**{name: value})
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_engine_option_errors(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown engine option 'blok_size'"):
        LLM(model=str(model_dir), blok_size=16)
    with pytest.raises(ValueError, match="block_size must be a power of two from 1 to 256, got 24"):
        LLM(model=str(model_dir), block_size=24)
    with pytest.raises(ValueError, match="preemption_mode"):
        LLM(model=str(model_dir), preemption_mode="sideways")
    with pytest.raises(ValueError, match=r"max_model_len \(4096\) exceeds the model's max_position_embeddings"):
        LLM(model=str(model_dir), max_model_len=4096)
    with pytest.raises(ValueError, match="needs 5 KV pages"):
        LLM(model=str(model_dir), num_kv_blocks=4).generate({"prompt_token_ids": [3] * 60},
                                                            SamplingParams(max_tokens=8), use_tqdm=False)


def test_missing_or_unsupported_models_are_refused(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(model=str(tmp_path / "nope"))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(model=str(gpt2))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((model_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors"):
        LLM(model=str(pickled))


def test_abort_returns_pages_and_the_engine_goes_on(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("to-abort", {"prompt_token_ids": list(range(3, 33))}, SamplingParams(max_tokens=30))
    engine.add_request("to-keep", {"prompt_token_ids": list(range(3, 13))},
                       SamplingParams(temperature=0, max_tokens=6))
    engine.step()
    engine.step()
    assert engine.abort("to-abort")
    assert not engine.abort_request(["to-abort", "never-existed"])
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["to-keep"] and len(finished[0].outputs[0].token_ids) == 6
    assert engine.get_metrics()["kv_blocks_used"] == 0


CLI_CASES = [
    (["generate", ""], "prompt must not be empty"),
    (["generate", "--max-tokens", "0", "hi"], "max_tokens must be"),
    (["generate", "--temperature", "-1", "hi"], "temperature must be"),
    (["generate", "--top-p", "2", "hi"], "top_p must be"),
    (["generate", "--max-model-len", "8", "a prompt far longer than eight byte tokens"], "max_model_len is 8"),
    (["generate", "--block-size", "3", "hi"], "block_size must be"),
]


@pytest.mark.parametrize(("argv", "message"), CLI_CASES)
def test_cli_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith("kvpage: error:")


def test_cli_model_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 1
    assert "does not exist" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert main(["generate", "--model", str(gpt2), "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "GPT2LMHeadModel" in err


def test_cli_entry_point_generates_and_fails_cleanly(model_dir: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "kvpage.cli", "generate", "--max-tokens", "5", "--json", "Hello"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    record = json.loads(ok.stdout.strip().splitlines()[-1])
    assert record["prompt"] == "Hello" and len(record["outputs"][0]["token_ids"]) == 5
    bad = subprocess.run([sys.executable, "-m", "kvpage.cli", "generate", "--model", str(model_dir), "--max-tokens",
                          "0", "x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
