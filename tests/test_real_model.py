"""A real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF file, against transformers.

The model has a real tokenizer with special tokens, a real chat template
(with a default system prompt), a generation config whose EOS is
``<|im_end|>``, and natural next-token distributions.  It is loaded two ways
(an HF directory written from the dequantized weights, and the ``.gguf`` file
itself), and served by ``kvpage serve --model FILE.gguf`` to the official
``openai`` client.  Greedy decoding in float32 must be token-identical to
transformers' ``generate``, stopping where it stops.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpage import LLM, SamplingParams
from kvpage.gguf_metadata import read_gguf_metadata
from kvpage.plan.cost import ModelShape
from tests.real_model import require_gguf_packages

# Mixed lengths: one-word answers that stop at <|im_end|> early, and open questions that run to max_tokens.
QUESTIONS = [
    "What is the capital of France?",
    "What is 2 + 2? Answer with one number.",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "Say hello.",
    "Translate 'thank you' into Spanish. Reply with the translation only.",
    "Why is the sky blue? Explain it to a child in two sentences.",
    "List the days of the week.",
    "What is the opposite of hot?",
    "Give me a short title for a story about a lost dog who finds his way home after a long winter.",
    "Is water wet? Answer yes or no.",
    "What do bees make?",
    "Describe a cat in five words.",
    "How many legs does a spider have?",
    "Suggest a name for a small bakery in a quiet village by the mountains, and say why in one sentence.",
    "What is the chemical symbol for gold?",
    "Count from one to five.",
]
MAX_TOKENS = 40
EOS = "<|im_end|>"


def chat_prompt(tokenizer: Any, question: str) -> str:
    return str(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True))


@pytest.fixture(scope="module")
def references(real_model: Any) -> dict[str, list[int]]:
    """transformers' greedy answer to each question, one prompt at a time (no padding), in float32."""
    tokenizer, model = real_model.tokenizer, real_model.hf_model
    eos = tokenizer.convert_tokens_to_ids(EOS)
    out = {}
    with torch.no_grad():
        for question in QUESTIONS:
            ids = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt", add_special_tokens=False).input_ids
            generated = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=eos,
                                       pad_token_id=eos)
            out[question] = generated[0, ids.shape[1]:].tolist()
    stopped = [q for q, ids in out.items() if ids[-1] == eos]
    assert 3 <= len(stopped) < len(QUESTIONS), "the set must mix answers that stop early with ones that do not"
    return out


def check_greedy_matches(llm: LLM, real_model: Any, references: dict[str, list[int]],
                         questions: list[str] = QUESTIONS) -> None:
    # The engine's own tokenizer renders the chat (the file's template for a GGUF file).
    prompts = [chat_prompt(llm.get_tokenizer(), q) for q in questions]
    assert prompts == [chat_prompt(real_model.tokenizer, q) for q in questions]
    assert "You are a helpful AI assistant named SmolLM" in prompts[0]  # the template's default system prompt
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    eos = real_model.tokenizer.convert_tokens_to_ids(EOS)
    for question, output in zip(questions, outputs):
        completion = output.outputs[0]
        expected = references[question]
        assert completion.token_ids == expected, question
        assert completion.finish_reason == ("stop" if expected[-1] == eos else "length"), question
    assert llm.engine.kv.num_pages_in_use == 0
    assert llm.get_metrics()["num_preemptions"] == 0


def test_greedy_chat_from_the_hf_directory_matches_transformers(real_model: Any,
                                                                references: dict[str, list[int]]) -> None:
    # Four seats for seventeen prompts: requests join and leave the batch as others finish.
    llm = LLM(model=str(real_model.hf_dir), max_num_seqs=4, dtype="float32")
    check_greedy_matches(llm, real_model, references)
    assert llm.engine.eos_token_ids == (real_model.tokenizer.convert_tokens_to_ids(EOS),)


def test_greedy_chat_over_three_tensor_parallel_ranks_matches_transformers(
        real_model: Any, references: dict[str, list[int]]) -> None:
    # SmolLM2's 9 query and 3 KV heads split over 3 ranks (gloo, one process each), its 49152-token vocabulary too.
    llm = LLM(model=str(real_model.hf_dir), max_num_seqs=4, dtype="float32", tensor_parallel_size=3)
    try:
        assert (llm.engine.model.shard.num_heads, llm.engine.cache_shape.num_kv_heads) == (3, 1)
        # Six of the questions (a rank step is collectives' latency on 2 cores): three answers that stop, three
        # that run to max_tokens.
        eos = real_model.tokenizer.convert_tokens_to_ids(EOS)
        stopping = [q for q in QUESTIONS if references[q][-1] == eos]
        check_greedy_matches(llm, real_model, references,
                             stopping[:3] + [q for q in QUESTIONS if q not in stopping][:3])
    finally:
        llm.shutdown()


def test_greedy_chat_from_the_gguf_file_matches_transformers(real_model: Any, references: dict[str, list[int]],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kvpage"):
        llm = LLM(model=str(real_model.gguf_path), max_num_seqs=6, dtype="float32")
    assert any("dequantized" in r.getMessage() and "Q4_1" in r.getMessage() and "float32" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert llm.engine.model_config.architecture == "LlamaForCausalLM"
    check_greedy_matches(llm, real_model, references)
    # The same weights as the directory written from transformers' dequantization, to the bit.
    hf_state = real_model.hf_model.state_dict()
    assert torch.equal(llm.engine.model.embed_tokens, hf_state["model.embed_tokens.weight"])


def test_the_planner_reads_a_gguf_files_shape_without_torch(real_model: Any) -> None:
    metadata = read_gguf_metadata(real_model.gguf_path)
    assert metadata.tensor_types["Q4_1"] > 0 and metadata.architecture == "llama"
    from_file = ModelShape.from_dict(metadata.config, dtype_bytes=4)
    assert from_file == ModelShape.from_config(real_model.hf_dir / "config.json", dtype_bytes=4)
    code = ("import sys, json; sys.modules['torch'] = None; from kvpage.cli import main; "
            f"sys.exit(main(['plan', '--model', {str(real_model.gguf_path)!r}, '--synthetic', 'sharegpt', "
            "'--num', '20', '--rate', '5', '--json', '--no-layouts', '--rate-factors', '', '--out', sys.argv[1]]))")
    result = subprocess.run([sys.executable, "-c", code, str(real_model.hf_dir.parent / "plan-out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["base"]["num_requests"] == 20
    assert report["model"] == str(real_model.gguf_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PIRATE = "You are a pirate. Answer every question as a pirate would"


@pytest.fixture(scope="module")
def pirate_tokenizer(real_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model's tokenizer files with another default system prompt in the chat template."""
    out = tmp_path_factory.mktemp("pirate-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(real_model.hf_dir / name, out / name)
    template = (out / "chat_template.jinja").read_text()
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in template
    (out / "chat_template.jinja").write_text(
        template.replace("You are a helpful AI assistant named SmolLM, trained by Hugging Face", PIRATE))
    return out


def test_kvpage_serve_a_gguf_file_answers_the_openai_client_as_the_offline_engine(
        real_model: Any, references: dict[str, list[int]], pirate_tokenizer: Path) -> None:
    """``kvpage serve --model FILE.gguf --tokenizer DIR``: the file's weights, the directory's chat template."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "kvpage.cli", "serve", "--model", str(real_model.gguf_path),
                               "--tokenizer", str(pirate_tokenizer), "--port", str(port), "--device", "cpu",
                               "--served-model-name", "smollm2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    # What the offline engine answers with the same tokenizer and template (kvpage from the HF directory).
    pirate = AutoTokenizer.from_pretrained(str(pirate_tokenizer))
    questions = QUESTIONS[:3]
    offline = LLM(model=str(real_model.hf_dir), tokenizer=str(pirate_tokenizer)).generate(
        [chat_prompt(pirate, q) for q in questions], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
        use_tqdm=False)
    assert PIRATE in chat_prompt(pirate, questions[0])
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                assert [m.id for m in client.models.list().data] == ["smollm2"]
                break
            except Exception:  # not listening yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        answers = []
        for question, expected in zip(questions, offline):
            reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                                   max_tokens=MAX_TOKENS, temperature=0.0)
            answers.append(reply.choices[0].message.content)
            assert answers[-1] == expected.outputs[0].text, question
    finally:
        server.terminate()
        log = server.communicate(timeout=60)[0]
    assert "dequantized SmolLM2-135M-Instruct.Q4_1.gguf" in log and "Q4_1" in log, log[-3000:]
    # The override took effect: the default template's answers differ.
    default = [real_model.tokenizer.decode(references[q], skip_special_tokens=True) for q in questions]
    assert answers != default, answers


def _tiny_gguf(path: Path, architecture: str) -> Path:
    """A GGUF file with only metadata: enough for the architecture check, which runs before any weight is read."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", torch.zeros(16, 64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_of_an_architecture_kvpage_does_not_run_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvpage.cli import main

    require_gguf_packages()
    path = _tiny_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; supported architectures are "
                                         r"LlamaForCausalLM, "):
        LLM(model=str(path))
    assert main(["generate", "--model", str(path), "hello"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvpage: error: architecture 'gpt2' is not supported") and "\n" not in err
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"this is not a gguf file")
    with pytest.raises(ValueError, match=r"model '.*broken.gguf' is not a readable GGUF file"):
        LLM(model=str(not_gguf))
    with pytest.raises(FileNotFoundError, match=r"model '.*missing.gguf': no such GGUF file"):
        LLM(model=str(tmp_path / "missing.gguf"))
