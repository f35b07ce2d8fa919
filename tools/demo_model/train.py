#!/usr/bin/env python3
"""Train kvpage's demo model: a small LlamaForCausalLM on the King James Bible.

Plain PyTorch: the model is transformers' ``LlamaForCausalLM`` built from a
``LlamaConfig`` (so the saved directory is an ordinary Hugging Face checkpoint),
trained with AdamW, a linear-warmup + cosine learning-rate schedule, bf16
autocast (fp32 master weights) and residual dropout. Everything is seeded.

Data: every verse of ``<corpus>/train.txt`` is encoded as ``<s> verse </s>`` and
the verses are concatenated, in order, into one token stream. Each training
sequence is a window of ``--seq-len`` + 1 tokens starting at a uniformly random
offset of that stream. Validation uses ``<corpus>/valid.txt`` encoded the same
way, cut into consecutive non-overlapping windows of ``--seq-len`` tokens (the
whole held-out split, every token counted once).

Outputs:
    <out>/config.json, model.safetensors (bf16), generation_config.json,
          tokenizer.json, tokenizer_config.json (copied from --tokenizer)
    <log>  JSON: the configuration, a record per evaluation (step, tokens seen,
           learning rate, running train loss, eval-mode train and validation
           loss) and a summary (parameter count, device, training time, final
           losses and perplexity). Rewritten at every evaluation.

A CPU smoke run:
    python tools/demo_model/train.py --device cpu --max-steps 5 --batch-size 2 \
        --seq-len 64 --eval-every 5 --out /tmp/demo-smoke --log /tmp/demo-smoke.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / ".data" / "demo_corpus")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".data" / "demo_tokenizer")
    ap.add_argument("--out", type=Path, default=ROOT / ".data" / "demo_model")
    ap.add_argument("--log", type=Path, default=None, help="JSON log (default: <out>.train_log.json)")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    ap.add_argument("--seed", type=int, default=1234)
    # model
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--max-position", type=int, default=1024)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--dropout", type=float, default=0.1, help="residual/embedding dropout in training")
    # optimisation
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-train-windows", type=int, default=32,
                    help="fixed training windows scored in eval mode at each evaluation")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="safety stop: end training after this many seconds (0: none). The "
                         "learning-rate schedule always follows --max-steps.")
    ap.add_argument("--no-bf16", action="store_true", help="train in fp32 (default: bf16 autocast on CUDA)")
    return ap.parse_args()


# --------------------------------------------------------------------------- data
def encode_verses(tokenizer_file: Path, text_file: Path) -> torch.Tensor:
    """``<s> verse </s>`` for every line of text_file, concatenated (int64, CPU)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    assert (bos, eos) == (0, 1), (bos, eos)
    lines = [ln for ln in text_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    # The post-processor already puts <s> in front of every encoding.
    encs = tok.encode_batch(lines, add_special_tokens=True)
    stream: list[int] = []
    for e in encs:
        assert e.ids[0] == bos
        stream.extend(e.ids)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


def valid_windows(stream: torch.Tensor, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows: inputs stream[i*T:(i+1)*T], targets shifted by one."""
    out = []
    n = stream.numel() - 1
    for start in range(0, n, seq_len):
        end = min(start + seq_len, n)
        out.append((stream[start:end], stream[start + 1:end + 1]))
    return out


# --------------------------------------------------------------------------- model
def build_model(args: argparse.Namespace, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.max_position,
        rms_norm_eps=1e-5,
        rope_theta=args.rope_theta,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        use_cache=True,
    )
    model = LlamaForCausalLM(config)
    return model


def add_residual_dropout(model, p: float) -> None:
    """nanoGPT-style dropout on the embeddings and on each residual branch's output.

    Implemented with forward hooks, so the architecture (and the saved checkpoint)
    stays plain Llama; the hooks only act while the module is in training mode.
    """
    if p <= 0:
        return

    def hook(module, inputs, output):
        return F.dropout(output, p=p, training=module.training)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    progress = min(1.0, progress)
    ratio = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * ratio


def main() -> None:
    args = parse_args()
    log_path = args.log or args.out.with_name(args.out.name + ".train_log.json")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    use_bf16 = device.type == "cuda" and not args.no_bf16
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t_setup = time.time()
    tok_file = args.tokenizer / "tokenizer.json"
    train_stream = encode_verses(tok_file, args.corpus / "train.txt")
    valid_stream = encode_verses(tok_file, args.corpus / "valid.txt")
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(tok_file)).get_vocab_size()
    print(f"train stream {train_stream.numel()} tokens, valid stream {valid_stream.numel()} tokens, "
          f"vocab {vocab_size} ({time.time() - t_setup:.1f}s)")

    model = build_model(args, vocab_size).to(device)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    print(f"LlamaForCausalLM: {n_params:,} parameters ({n_params * 2 / 2**20:.1f} MiB in bf16)")
    add_residual_dropout(model, args.dropout)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )

    train_dev = train_stream.to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    arange = torch.arange(args.seq_len + 1, device=device)
    n_starts = train_stream.numel() - args.seq_len - 1

    def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, n_starts, (n,), device=device, generator=g)
        w = train_dev[starts[:, None] + arange]
        return w[:, :-1], w[:, 1:]

    # Fixed windows for the eval-mode train loss.
    g_eval = torch.Generator(device=device)
    g_eval.manual_seed(args.seed + 1)
    eval_train = batch(args.eval_train_windows, g_eval)
    vwins = valid_windows(valid_stream, args.seq_len)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    @torch.no_grad()
    def loss_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        with autocast():
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        return loss.item(), y.numel()

    def evaluate() -> tuple[float, float]:
        model.eval()
        tot, cnt = 0.0, 0
        full = [w for w in vwins if w[0].numel() == args.seq_len]
        rest = [w for w in vwins if w[0].numel() != args.seq_len]
        for i in range(0, len(full), args.batch_size):
            chunk = full[i:i + args.batch_size]
            x = torch.stack([c[0] for c in chunk]).to(device)
            y = torch.stack([c[1] for c in chunk]).to(device)
            s, c = loss_sum(x, y)
            tot, cnt = tot + s, cnt + c
        for x, y in rest:
            s, c = loss_sum(x[None].to(device), y[None].to(device))
            tot, cnt = tot + s, cnt + c
        val = tot / cnt
        ttot, tcnt = 0.0, 0
        for i in range(0, args.eval_train_windows, args.batch_size):
            s, c = loss_sum(eval_train[0][i:i + args.batch_size], eval_train[1][i:i + args.batch_size])
            ttot, tcnt = ttot + s, tcnt + c
        model.train()
        return ttot / tcnt, val

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    import transformers

    log = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "parameters": n_params,
        "train_tokens": train_stream.numel(),
        "valid_tokens": valid_stream.numel(),
        "tokens_per_step": args.batch_size * args.seq_len,
        "records": [],
    }

    def write_log() -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = log_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(log, indent=1))
        os.replace(tmp, log_path)

    model.train()
    run_loss, run_n = 0.0, 0
    best = (float("inf"), -1)
    t0 = time.time()
    step = 0
    stopped_early = False
    while step < args.max_steps:
        lr = lr_at(step, args)
        for grp in opt.param_groups:
            grp["lr"] = lr
        x, y = batch(args.batch_size, gen)
        with autocast():
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        run_loss += loss.detach()
        run_n += 1
        over_time = args.time_budget > 0 and time.time() - t0 > args.time_budget
        if step % args.eval_every == 0 or step == args.max_steps or over_time:
            running = (run_loss / run_n).item()
            run_loss, run_n = 0.0, 0
            elapsed = time.time() - t0
            tr, va = evaluate()
            if va < best[0]:
                best = (va, step)
            rec = {"step": step, "tokens": step * args.batch_size * args.seq_len, "lr": lr,
                   "train_loss_running": running, "train_loss": tr, "val_loss": va,
                   "val_ppl": math.exp(va), "elapsed_s": elapsed}
            log["records"].append(rec)
            write_log()
            print(f"step {step:6d} | lr {lr:.2e} | train(running) {running:.4f} | train {tr:.4f} | "
                  f"val {va:.4f} (ppl {math.exp(va):.2f}) | {elapsed:.0f}s "
                  f"({step / elapsed:.1f} steps/s)", flush=True)
            if over_time and step < args.max_steps:
                print(f"time budget of {args.time_budget:.0f}s reached at step {step}; stopping", flush=True)
                stopped_early = True
                break
    train_time = time.time() - t0

    final = log["records"][-1]
    log["summary"] = {
        "steps": step,
        "stopped_early": stopped_early,
        "train_time_s": round(train_time, 1),
        "device": device_name,
        "parameters": n_params,
        "epochs": step * args.batch_size * args.seq_len / train_stream.numel(),
        "final_train_loss": final["train_loss"],
        "final_train_loss_running": final["train_loss_running"],
        "final_val_loss": final["val_loss"],
        "final_val_ppl": final["val_ppl"],
        "best_val_loss": best[0],
        "best_val_step": best[1],
    }
    write_log()
    print(json.dumps(log["summary"], indent=1))

    # ---------------------------------------------------------------- save
    from transformers import GenerationConfig

    model.eval()
    model = model.to(device="cpu", dtype=torch.bfloat16)
    model.config.use_cache = True
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, do_sample=False).save_pretrained(str(args.out))
    for name in TOKENIZER_FILES:
        if (args.tokenizer / name).exists():
            shutil.copy2(args.tokenizer / name, args.out / name)
    for p in sorted(args.out.iterdir()):
        print(f"  {p.name}: {p.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
