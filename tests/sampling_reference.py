"""What a sampler must draw, by transformers' own processors and warpers, and a test that its draws do.

:func:`reference_probs` turns one row of logits and a :class:`SamplingParams`
into the distribution the next token must follow: transformers'
``MinNewTokensLengthLogitsProcessor`` and ``RepetitionPenaltyLogitsProcessor``,
then its warpers in vLLM's order (``TemperatureLogitsWarper``,
``MinPLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``), then a
softmax, in float64; a greedy row puts all its mass on the argmax.

:func:`disagreement` is the statistical test that i.i.d. draws follow such a
distribution. Its false-alarm rate is at most ``alpha`` (a union bound over
exact, non-asymptotic tail bounds; no chi-square approximation):

1. no draw of a token of probability 0 (this check never gives a false alarm);
2. per cell, a two-sided Chernoff bound: every token expected at least
   ``MIN_CELL`` times is a cell, the other tokens of positive probability
   pool into one; for a cell of probability ``p`` drawn ``X`` times out of
   ``N``, ``P(X at least as far from N p, on that side) <= exp(-N KL(X/N || p))``
   (``alpha / 2`` shared by the cells and both sides);
3. Bernstein's inequality on the mean raw logit of the drawn tokens (the
   sufficient statistic of the temperature, so the most sensitive to a wrong
   one): ``P(|mean - mu| >= t) <= 2 exp(-N t^2 / (2 sigma^2 + 2 b t / 3))``,
   ``b`` the largest ``|logit - mu|`` on the support (``alpha / 2``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvpage import SamplingParams
from kvpage.step_io import ScheduledSequence
from tests.checkpoints import make_checkpoint

__all__ = ["FALSE_ALARM", "MIN_CELL", "disagreement", "make_mild_checkpoint", "reference_probs", "scheduled"]

# The false-alarm rate of one comparison of draws with a reference. The suite makes fewer than 100 of them,
# so a correct sampler fails any of them with probability below 1e-6.
FALSE_ALARM = 1e-8
MIN_CELL = 10  # tokens expected fewer times than this share one pooled cell
# A top-p or min-p setting must keep the same tokens when moved this much: kvpage's logits and
# transformers' differ by rounding, and a setting on a knife edge would compare rounding, not sampling.
_BOUNDARY_MARGIN = 1e-4


def reference_probs(logits: torch.Tensor, params: SamplingParams, prompt: list[int] | None = None,
                    output: list[int] | None = None, eos_token_ids: list[int] | None = None,
                    min_p_last: bool = False) -> torch.Tensor:
    """The next-token distribution (float64 ``[vocab]``) of ``params`` on one row of raw ``logits``.

    ``prompt`` and ``output`` are the tokens so far (the repetition penalty and ``min_tokens`` read
    them); presence and frequency penalties are left to the tests that own them. ``min_p_last``
    applies min-p after top-p, as transformers' generate() does: a wrong order, for power checks.
    """
    assert not (params.presence_penalty or params.frequency_penalty), "reference_probs has no presence/frequency"
    scores = _processed(logits, params, prompt or [], output or [], eos_token_ids or [])
    if params.is_greedy:
        return torch.nn.functional.one_hot(scores.argmax(), scores.numel()).double()
    kept = _warped(scores, params, min_p_last)
    for moved in _neighbours(params):
        assert torch.equal(_warped(scores, moved, min_p_last).isfinite(), kept.isfinite()), (
            f"{params} sits on a top-p / min-p boundary of these logits; pick another value")
    return kept.softmax(dim=-1)[0]


def _processed(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
               eos_token_ids: list[int]) -> torch.Tensor:
    input_ids = torch.tensor([prompt + output], dtype=torch.long)
    scores = logits.detach().double().reshape(1, -1)
    if params.min_tokens:
        held = eos_token_ids + list(params.stop_token_ids or [])
        scores = MinNewTokensLengthLogitsProcessor(len(prompt), params.min_tokens, held)(input_ids, scores)
    if params.repetition_penalty != 1:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, scores)
    return scores


def _warped(scores: torch.Tensor, params: SamplingParams, min_p_last: bool) -> torch.Tensor:
    """vLLM's order: temperature, min-p, top-k, top-p (transformers' generate() puts min-p last)."""
    input_ids = torch.zeros((1, 0), dtype=torch.long)
    scores = TemperatureLogitsWarper(float(params.temperature))(input_ids, scores)
    if params.min_p and not min_p_last:
        scores = MinPLogitsWarper(params.min_p)(input_ids, scores)
    if params.effective_top_k:
        kept = scores[0].sort(descending=True).values
        k = params.effective_top_k
        if k < kept.numel() and kept[k].isfinite():
            assert kept[k - 1] - kept[k] > 1e-4, f"top_k={k} splits a near tie of these logits"
        scores = TopKLogitsWarper(k)(input_ids, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(input_ids, scores)
    if params.min_p and min_p_last:
        scores = MinPLogitsWarper(params.min_p)(input_ids, scores)
    return scores


def _neighbours(params: SamplingParams) -> list[SamplingParams]:
    moved = []
    for delta in (-_BOUNDARY_MARGIN, _BOUNDARY_MARGIN):
        if params.top_p < 1:
            moved.append(replace(params, top_p=params.top_p + delta))
        if params.min_p:
            moved.append(replace(params, min_p=params.min_p * (1 + delta)))
    return moved


def disagreement(tokens: torch.Tensor, probs: torch.Tensor, logits: torch.Tensor,
                 alpha: float = FALSE_ALARM) -> str | None:
    """Why the draws ``tokens`` do not follow ``probs``, or None; a correct sampler is refused with P <= alpha.

    ``logits`` are the raw logits of the row, the statistic of the third check (module docstring).
    """
    probs = probs.double()
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    impossible = ((probs == 0) & (counts > 0)).nonzero().flatten().tolist()
    if impossible:
        return f"drew tokens {impossible[:8]} ({int(counts[impossible].sum())} times) that have probability 0"
    alone = n * probs >= MIN_CELL
    pooled = (probs > 0) & ~alone
    cell_p = torch.cat([probs[alone], probs[pooled].sum().reshape(1)])
    cell_x = torch.cat([counts[alone], counts[pooled].sum().reshape(1)])
    keep = cell_p > 0
    cell_p, cell_x = cell_p[keep], cell_x[keep]
    if cell_p.numel() > 1:
        q = cell_x / n
        kl = torch.special.xlogy(q, q / cell_p) + torch.special.xlogy(1 - q, (1 - q) / (1 - cell_p))
        log_bound = -n * kl
        worst = int(log_bound.argmin())
        log_threshold = math.log(alpha / 2 / (2 * cell_p.numel()))
        if log_bound[worst] < log_threshold:
            return (f"a cell of probability {cell_p[worst]:.4f} was drawn {int(cell_x[worst])} times of {n} "
                    f"(expected {n * cell_p[worst]:.1f}); log tail bound {log_bound[worst]:.1f} < {log_threshold:.1f}")
    support = probs > 0
    values = logits.detach().double().cpu()
    mu = (probs[support] * values[support]).sum()
    variance = (probs[support] * (values[support] - mu) ** 2).sum()
    spread = (values[support] - mu).abs().max()
    mean = values[tokens.cpu()].mean()
    t = (mean - mu).abs()
    log_bound_mean = math.log(2) - n * t**2 / (2 * variance + 2 * spread * t / 3) if spread > 0 else 0.0
    if log_bound_mean < math.log(alpha / 2):
        return (f"the draws' mean logit is {mean:.4f}, expected {mu:.4f}; "
                f"log tail bound {float(log_bound_mean):.1f} < {math.log(alpha / 2):.1f}")
    return None


def make_mild_checkpoint(directory: Path, seed: int = 3, lm_head_gain: float = 0.12) -> Path:
    """A tiny llama (vocab 512) whose logits spread over many tokens: make_checkpoint's LM head scaled down.

    make_checkpoint's steep head (logits of standard deviation ~16) makes most next-token distributions
    nearly one-hot, where a wrong temperature or cut hardly changes a draw; this one's is ~2.
    """
    make_checkpoint(directory, "llama", seed=seed, vocab_size=512)
    weights_path = directory / "model.safetensors"
    weights = load_file(weights_path)
    weights["lm_head.weight"] = weights["lm_head.weight"] * lm_head_gain
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    return directory


def scheduled(seq_id: int, params: SamplingParams, sample_index: int, prompt: list[int],
              output: list[int] | None = None) -> ScheduledSequence:
    """A sampler row that picks the token after ``prompt + output``."""
    tokens = prompt + (output or [])
    return ScheduledSequence(seq_id=seq_id, input_token_ids=[tokens[-1]], start_position=len(tokens) - 1,
                             page_ids=[], sample=True, sampling_params=params, sample_index=sample_index,
                             all_token_ids=tokens, num_prompt_tokens=len(prompt))
