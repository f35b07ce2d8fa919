"""Turns the last position's logits of each sampled sequence into a token.

Order of operations, per row (vLLM's semantics):

1. logprobs, when asked for, come from the raw logits (before penalties and
   temperature), so they describe the model, not the sampler;
2. repetition penalty over prompt and output tokens (HF's rule: positive
   logits divided, negative multiplied), then frequency and presence
   penalties over output tokens;
3. while fewer than ``min_tokens`` were generated, EOS and ``stop_token_ids``
   are masked out;
4. greedy rows take the argmax; the others divide by the temperature, apply
   top-k, top-p and min-p, and draw with the exponential-race trick
   (argmax of p / Exp(1)), which equals sampling from p.

A request with a ``seed`` draws from its own generator, seeded from
``seed + sample_index``, so its tokens do not depend on what else is batched.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvpage.batch import SampledToken, ScheduledSequence


class Sampler:
    """Samples one token per row; keeps the per-sequence random generators."""

    def __init__(self, device: torch.device, seed: int, eos_token_ids: tuple[int, ...]) -> None:
        self.device = device
        self.eos_token_ids = list(eos_token_ids)
        self.shared_generator = torch.Generator(device=device)
        self.shared_generator.manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}

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
        params = [s.sampling_params for s in seqs]
        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        logits = logits.clone() if any(p.has_penalties or p.min_tokens for p in params) else logits
        for row, seq in enumerate(seqs):
            p = seq.sampling_params
            if p.has_penalties:
                self._apply_penalties(logits[row], seq)
            if p.min_tokens and len(seq.all_token_ids) - seq.num_prompt_tokens < p.min_tokens:
                banned = self.eos_token_ids + list(p.stop_token_ids or [])
                if banned:
                    logits[row, banned] = float("-inf")

        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if greedy:
            tokens[greedy] = logits[greedy].argmax(dim=-1)
        if sampled:
            probs = self._filtered_probs(logits[sampled], [params[i] for i in sampled])
            tokens[sampled] = self._draw(probs, [seqs[i] for i in sampled])

        token_list = tokens.tolist()
        results = [SampledToken(token_id=t) for t in token_list]
        if raw_logprobs is not None:
            self._attach_logprobs(raw_logprobs, token_list, seqs, results)
        beams = [i for i, p in enumerate(params) if p.use_beam_search]
        if beams:
            self._attach_beam_candidates(logits, beams, params, results)
        return results

    def _attach_beam_candidates(self, logits: torch.Tensor, rows: list[int], params: list,
                                results: list[SampledToken]) -> None:
        """Each beam's best next tokens by raw log-probability, as many as the beam step can use."""
        logprobs = torch.log_softmax(logits[rows], dim=-1)
        k = min(logprobs.shape[-1], max(2, 1 + len(self.eos_token_ids)) * max(params[i].beam_width for i in rows))
        values, indices = torch.topk(logprobs, k, dim=-1)
        for row, vals, ids in zip(rows, values.tolist(), indices.tolist()):
            results[row].beam_candidates = list(zip(ids, vals))

    @staticmethod
    def _apply_penalties(row: torch.Tensor, seq: ScheduledSequence) -> None:
        p = seq.sampling_params
        ids = torch.tensor(seq.all_token_ids, dtype=torch.long, device=row.device)
        if p.repetition_penalty != 1:
            seen = torch.unique(ids)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        output_ids = ids[seq.num_prompt_tokens :]
        if output_ids.numel() and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(output_ids, minlength=row.numel()).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)
        logits = logits / temps.unsqueeze(1)
        top_ks = [p.effective_top_k for p in params]
        if any(top_ks):
            vocab = logits.shape[-1]
            k = torch.tensor([k if k else vocab for k in top_ks], device=logits.device).clamp(max=vocab)
            sorted_desc = logits.sort(dim=-1, descending=True).values
            kth = sorted_desc.gather(1, (k - 1).unsqueeze(1))
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_ps = [p.top_p for p in params]
        if any(tp < 1 for tp in top_ps):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            limit = torch.tensor(top_ps, dtype=probs.dtype, device=probs.device).unsqueeze(1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop_sorted = mass_before >= limit
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        min_ps = [p.min_p for p in params]
        if any(min_ps):
            floor = torch.tensor(min_ps, dtype=probs.dtype, device=probs.device).unsqueeze(1)
            probs = probs.masked_fill(probs < floor * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs / probs.sum(dim=-1, keepdim=True)

    def _draw(self, probs: torch.Tensor, seqs: list[ScheduledSequence]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        shared_rows = [i for i, s in enumerate(seqs) if s.sampling_params.seed is None]
        if shared_rows:
            noise[shared_rows] = torch.empty(len(shared_rows), probs.shape[1], dtype=probs.dtype,
                                             device=probs.device).exponential_(generator=self.shared_generator)
        for i, seq in enumerate(seqs):
            if seq.sampling_params.seed is not None:
                noise[i].exponential_(generator=self._generator_for(seq))
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _attach_logprobs(raw: torch.Tensor, tokens: list[int], seqs: list[ScheduledSequence],
                         results: list[SampledToken]) -> None:
        rows = [i for i, s in enumerate(seqs) if s.sampling_params.logprobs is not None]
        max_k = max(seqs[i].sampling_params.logprobs or 0 for i in rows)
        sub = raw[rows]
        chosen = sub.gather(1, torch.tensor([[tokens[i]] for i in rows], device=raw.device)).squeeze(1).tolist()
        top_values, top_ids = (sub.topk(max_k, dim=-1) if max_k else (None, None))
        top_values_list = top_values.tolist() if top_values is not None else None
        top_ids_list = top_ids.tolist() if top_ids is not None else None
        for j, i in enumerate(rows):
            k = seqs[i].sampling_params.logprobs or 0
            entry = {tokens[i]: chosen[j]}
            if k and top_ids_list is not None and top_values_list is not None:
                for tid, lp in zip(top_ids_list[j][:k], top_values_list[j][:k]):
                    entry.setdefault(tid, lp)
            results[i].logprobs = entry
