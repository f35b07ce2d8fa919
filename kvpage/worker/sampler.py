"""Turns the last position's logits of each sampled sequence into a token.

Order of operations, per row (vLLM's semantics; docs/sampling.md states each knob exactly):

1. logprobs, when asked for, come from the raw logits (before any of what
   follows), so they describe the model, not the sampler;
2. while fewer than ``min_tokens`` were generated, EOS and ``stop_token_ids``
   are masked out (set to -inf);
3. repetition penalty over prompt and output tokens (positive logits
   divided, negative multiplied), then frequency and presence penalties over
   output tokens only (:meth:`Sampler.processed_logits` is steps 2 and 3);
4. greedy rows take the argmax; the others divide by the temperature, cut by
   min-p, then top-k, then top-p (each on what the one before kept), and draw
   with the exponential-race trick (argmax of p / Exp(1)), which equals
   sampling from p.

A request with a ``seed`` draws from its own generator, seeded from
``seed + sample_index``, so its tokens do not depend on what else is batched.

Where the Triton kernels run, plain temperature rows (no top-k, top-p,
min-p) instead draw in one pass over the logits by the Gumbel-max trick
(:mod:`kvpage.ops.triton_sampling`), keyed per row the same batch-independent
way: a different random stream from the torch path, the same distribution.
Which of the three rules a row takes depends on its own parameters only,
never on its batch: that is what keeps a seeded row's tokens batch-independent.

``sample`` only enqueues the device work and starts copying the results to
the host; :meth:`PendingSamples.result` waits for them. The engine plans the
next step in between.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch

from kvpage.ops.transfer import to_device
from kvpage.sampling_params import SamplingParams
from kvpage.step_io import SampledToken, ScheduledSequence

# How a row's token is picked: the argmax, the one-pass kernel, or the filtered draw of the torch path.
Rule = Literal["greedy", "one_pass", "filtered"]


class Sampler:
    """Samples one token per row; keeps the per-sequence random generators."""

    def __init__(self, device: torch.device, seed: int, eos_token_ids: tuple[int, ...],
                 use_kernels: bool = False) -> None:
        self.device = device
        self.eos_token_ids = list(eos_token_ids)
        self.seed = seed
        self.shared_generator = torch.Generator(device=device)
        self.shared_generator.manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}
        # Plain temperature rows draw with the one-pass Triton kernel (kvpage.ops.triton_sampling).
        self.use_kernels = use_kernels
        self._num_kernel_draws = 0

    def forget(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            self._generators.pop(seq_id, None)

    def _generator_for(self, seq: ScheduledSequence) -> torch.Generator:
        seed = seq.sampling_params.seed
        if seed is None:
            return self.shared_generator
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed + seq.sample_index)
            self._generators[seq.seq_id] = gen
        return gen

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[ScheduledSequence]) -> list[SampledToken]:
        """``logits``: float32 ``[len(seqs), vocab]``, one row per sampled sequence."""
        return self.sample(logits, seqs).result()

    def rule(self, params: SamplingParams) -> Rule:
        """How this row's token is picked; it depends on the row alone, never on its batch."""
        if params.is_greedy:
            return "greedy"
        return "one_pass" if self.use_kernels and _plain_temperature(params) else "filtered"

    def needs_float32(self, seqs: list[ScheduledSequence]) -> bool:
        """Whether these rows need float32 logits; the kernel path reads them in the model dtype.

        Greedy rows compare the same values either way (float32 logits are the
        model-dtype ones, widened), so only logprobs, penalties, ``min_tokens``,
        beam search and the torch sampling path need the float32 copy.
        """
        if not self.use_kernels:
            return True
        for seq in seqs:
            p = seq.sampling_params
            if (p.logprobs is not None or p.has_penalties or p.min_tokens or p.use_beam_search
                    or self.rule(p) == "filtered"):
                return True
        return False

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[ScheduledSequence]) -> PendingSamples:
        """Enqueue the sampling of one token per row; the host reads them with ``result()``.

        ``logits`` are float32, or in the model dtype where :meth:`needs_float32` said so.
        """
        if logits.dtype != torch.float32 and self.needs_float32(seqs):
            logits = logits.float()
        params = [s.sampling_params for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        logits = self.processed_logits(logits, seqs)
        tokens = self._pick(logits, seqs)
        pending = PendingSamples(tokens, seqs)
        if raw_logprobs is not None:
            pending.add_logprobs(raw_logprobs, tokens)
        beams = [i for i, p in enumerate(params) if p.use_beam_search]
        if beams:
            logprobs = torch.log_softmax(logits[beams], dim=-1)
            width = max(_beam_width(params[i]) for i in beams)
            k = min(logprobs.shape[-1], max(2, 1 + len(self.eos_token_ids)) * width)
            pending.add_beam_candidates(beams, *torch.topk(logprobs, k, dim=-1))
        pending.start_copy()
        return pending

    def held_back_tokens(self, seq: ScheduledSequence) -> list[int]:
        """The tokens masked out for this row now: EOS and ``stop_token_ids`` until ``min_tokens`` were generated.

        EOS is held back even with ``ignore_eos``, as vLLM does (it counts EOS among the stop tokens there).
        """
        p = seq.sampling_params
        if not p.min_tokens or len(seq.all_token_ids) - seq.num_prompt_tokens >= p.min_tokens:
            return []
        return self.eos_token_ids + list(p.stop_token_ids or [])

    def processed_logits(self, logits: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
        """Steps 2 and 3 of the module docstring: ``min_tokens`` masking and penalties (a copy where they apply).

        Greedy rows take the argmax of these; sampled rows start from them.
        """
        held_back = [self.held_back_tokens(seq) for seq in seqs]
        changed = [row for row, seq in enumerate(seqs) if held_back[row] or seq.sampling_params.has_penalties]
        if not changed:
            return logits
        logits = logits.clone()
        for row in changed:
            if held_back[row]:
                logits[row, held_back[row]] = float("-inf")
            if seqs[row].sampling_params.has_penalties:
                _apply_penalties(logits[row], seqs[row])
        return logits

    def _pick(self, logits: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
        """One token per row, each by its own :meth:`rule`; a batch of one rule runs without gathering rows."""
        rules = [self.rule(s.sampling_params) for s in seqs]
        kinds = set(rules)
        if kinds == {"greedy", "one_pass"}:  # the kernel draws every row; greedy ones then take the argmax
            return self._gumbel_max(logits, seqs)
        pickers: dict[Rule, Callable[[torch.Tensor, list[ScheduledSequence]], torch.Tensor]] = {
            "greedy": lambda rows_logits, _: rows_logits.argmax(dim=-1),
            "one_pass": self._gumbel_max,
            "filtered": lambda rows_logits, rows: self._draw(
                self._filtered_probs(rows_logits, [s.sampling_params for s in rows]), rows),
        }
        if len(kinds) == 1:
            return pickers[rules[0]](logits, seqs)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        for kind in sorted(kinds):  # a fixed order, so the shared generator's stream is reproducible
            rows = [i for i, r in enumerate(rules) if r == kind]
            index = to_device(rows, torch.long, logits.device)
            tokens.index_copy_(0, index, pickers[kind](logits.index_select(0, index), [seqs[i] for i in rows]))
        return tokens

    def _gumbel_max(self, logits: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
        """Plain temperature sampling in one kernel pass; greedy rows among them take the argmax.

        A seeded row's Philox key mixes its seed, sample index and the position
        it samples, so its draw is the same in any batch; other rows mix the
        engine seed, a per-call counter and the row.
        """
        from kvpage.ops.triton_sampling import gumbel_max_sample, mix_seed

        draw = self._num_kernel_draws
        self._num_kernel_draws += 1
        temperatures, seeds = [], []
        for row, seq in enumerate(seqs):
            p = seq.sampling_params
            temperatures.append(p.temperature if not p.is_greedy else 1.0)
            position = seq.start_position + len(seq.input_token_ids)
            seeds.append(mix_seed(p.seed, seq.sample_index, position) if p.seed is not None
                         else mix_seed(self.seed, draw, row, 1 << 40))
        device = logits.device
        tokens = gumbel_max_sample(logits, to_device(temperatures, torch.float32, device),
                                   to_device(seeds, torch.long, device))
        is_greedy = [seq.sampling_params.is_greedy for seq in seqs]
        if any(is_greedy):
            tokens = torch.where(to_device(is_greedy, torch.bool, device), logits.argmax(dim=-1), tokens)
        return tokens

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """``softmax(logits / T)`` cut by min-p, then top-k, then top-p (vLLM's order), renormalized."""
        device = logits.device
        logits = logits / to_device([p.temperature for p in params], logits.dtype, device).unsqueeze(1)
        min_ps = [p.min_p for p in params]
        if any(min_ps):
            # p_i >= min_p * p_max exactly when logit_i >= max logit + log(min_p): no softmax needed.
            log_min_p = to_device([math.log(m) if m else -math.inf for m in min_ps], logits.dtype, device)
            floor = logits.max(dim=-1, keepdim=True).values + log_min_p.unsqueeze(1)
            logits = logits.masked_fill(logits < floor, float("-inf"))
        top_ks = [p.effective_top_k for p in params]
        top_ps = [p.top_p for p in params]
        if any(top_ks) or any(tp < 1 for tp in top_ps):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            if any(top_ks):
                vocab = logits.shape[-1]
                k = to_device([min(k, vocab) if k else vocab for k in top_ks], torch.long, device)
                kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))
                # Tokens tied with the k-th stay, as in transformers and vLLM.
                sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
            if any(tp < 1 for tp in top_ps):
                sorted_probs = sorted_logits.softmax(dim=-1)
                mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays);
                # a row with top_p == 1 keeps everything, even where rounding lifts the sum past 1.
                limit = to_device([tp if tp < 1 else math.inf for tp in top_ps], logits.dtype, device)
                sorted_logits = sorted_logits.masked_fill(mass_before >= limit.unsqueeze(1), float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        return logits.softmax(dim=-1)

    def _draw(self, probs: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        shared_rows = [i for i, s in enumerate(seqs) if s.sampling_params.seed is None]
        if len(shared_rows) == len(seqs):
            return probs.div_(noise.exponential_(generator=self.shared_generator)).argmax(dim=-1)
        if shared_rows:
            noise.index_copy_(0, to_device(shared_rows, torch.long, probs.device),
                              torch.empty(len(shared_rows), probs.shape[1], dtype=probs.dtype,
                                          device=probs.device).exponential_(generator=self.shared_generator))
        for i, seq in enumerate(seqs):
            if seq.sampling_params.seed is not None:
                noise[i].exponential_(generator=self._generator_for(seq))
        return (probs / noise).argmax(dim=-1)


def _apply_penalties(row: torch.Tensor, seq: ScheduledSequence) -> None:
    """vLLM's penalties, in place on one row of logits (docs/sampling.md gives the formulas)."""
    p = seq.sampling_params
    ids = to_device(seq.all_token_ids, torch.long, row.device)
    if p.repetition_penalty != 1:
        seen = torch.unique(ids)  # prompt and output tokens alike
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    output_ids = ids[seq.num_prompt_tokens :]
    if output_ids.numel() and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(output_ids, minlength=row.numel()).to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _beam_width(params: SamplingParams) -> int:
    """The beam width of a beam-search row; ``SamplingParams`` sets it (default ``n``) when validated."""
    assert params.beam_width is not None, "beam search params have a beam_width once validated"
    return params.beam_width


def _plain_temperature(params: SamplingParams) -> bool:
    """Sampling from ``softmax(logits / temperature)`` with no top-k, top-p or min-p cut."""
    return not params.effective_top_k and params.top_p >= 1 and not params.min_p


class PendingSamples:
    """One step's sampled tokens (and logprobs, beam candidates) on their way to the host.

    The device tensors are final once enqueued; ``start_copy`` moves them to
    host memory asynchronously (pinned, on a GPU) and records an event, and
    ``result`` waits for that event only, never for later work on the device.
    """

    def __init__(self, tokens: torch.Tensor, seqs: list[ScheduledSequence]) -> None:
        self.tokens = tokens  # [rows] int64, on the device: the next step reads in-flight inputs from it
        self.seqs = seqs
        self._device: dict[str, torch.Tensor] = {"tokens": tokens}
        self.logprob_rows: list[int] = []
        self.beam_rows: list[int] = []
        self._host: dict[str, torch.Tensor] = {}
        self._event: torch.cuda.Event | None = None
        self._results: list[SampledToken] | None = None

    def add_logprobs(self, raw: torch.Tensor, tokens: torch.Tensor) -> None:
        rows = [i for i, s in enumerate(self.seqs) if s.sampling_params.logprobs is not None]
        max_k = max(self.seqs[i].sampling_params.logprobs or 0 for i in rows)
        index = to_device(rows, torch.long, raw.device)
        sub = raw.index_select(0, index)
        self._device["chosen"] = sub.gather(1, tokens.index_select(0, index).unsqueeze(1)).squeeze(1)
        if max_k:
            self._device["top_values"], self._device["top_ids"] = sub.topk(max_k, dim=-1)
        self.logprob_rows = rows

    def add_beam_candidates(self, rows: list[int], values: torch.Tensor, ids: torch.Tensor) -> None:
        self.beam_rows = rows
        self._device["beam_values"], self._device["beam_ids"] = values, ids

    def start_copy(self) -> None:
        on_gpu = self.tokens.is_cuda
        self._host = {name: t.to("cpu", non_blocking=on_gpu) for name, t in self._device.items()}
        if on_gpu:
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> list[SampledToken]:
        """Wait for the copies and build one :class:`SampledToken` per row (once; later calls reuse it)."""
        if self._results is not None:
            return self._results
        if self._event is not None:
            self._event.synchronize()
        host = {name: t.tolist() for name, t in self._host.items()}
        token_list = host["tokens"]
        results = [SampledToken(token_id=t) for t in token_list]
        if self.logprob_rows:
            top_ids, top_values = host.get("top_ids"), host.get("top_values")
            for j, i in enumerate(self.logprob_rows):
                k = self.seqs[i].sampling_params.logprobs or 0
                entry = {token_list[i]: host["chosen"][j]}
                if k and top_ids is not None and top_values is not None:
                    for tid, lp in zip(top_ids[j][:k], top_values[j][:k]):
                        entry.setdefault(tid, lp)
                results[i].logprobs = entry
        for j, i in enumerate(self.beam_rows):
            results[i].beam_candidates = list(zip(host["beam_ids"][j], host["beam_values"][j]))
        self._results = results
        return results
