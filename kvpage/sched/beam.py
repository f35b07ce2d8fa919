"""Beam search over shared pages: the bookkeeping of one request's beams (pure Python).

A beam search request keeps ``beam_width`` running sequences.  Each step the
runner returns, for every running beam, its best few next tokens with their
log-probabilities; :meth:`BeamGroup.step` then picks the next generation of
beams exactly as Hugging Face transformers' ``generate(num_beams=...)``
does:

1. add each candidate's log-probability to its beam's running score and keep
   the top ``K = max(2, 1 + number of EOS tokens) x beam_width`` candidates;
2. a candidate that ends with EOS or reaches ``max_tokens`` *finishes*: if it
   is among the top ``beam_width``, it joins the finished hypotheses with
   score ``sum of log-probs / generated_length ** length_penalty``, and the
   best ``beam_width`` finished hypotheses are kept;
3. the best ``beam_width`` candidates that did not finish become the next
   running beams;
4. the search stops when the early-stopping rule (``early_stopping`` True,
   False or ``"never"``) says no running beam can beat the finished ones, or
   when every candidate finished.

The scheduler turns the choice into page operations: a beam chosen twice is
forked (its pages shared copy-on-write), a beam not chosen is freed, and
the returned hypotheses are the best ``n`` finished ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NEG_INF = -1.0e9  # transformers' "impossible" score, kept so ties and orderings match


@dataclass(frozen=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # generated tokens, EOS included
    score: float
    finished: bool
    finish_reason: str | None


@dataclass(frozen=True)
class BeamChoice:
    """Next running beam: the parent beam's sequence id, the token it appends, its running score."""

    parent_seq_id: int
    token_id: int
    score: float


@dataclass
class BeamGroup:
    width: int
    num_return: int
    length_penalty: float
    early_stopping: bool | str
    eos_token_ids: frozenset[int]
    max_new_tokens: int
    running: list[tuple[int, float]] = field(default_factory=list)  # (seq_id, running score)
    candidates: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    finished: list[Hypothesis] = field(default_factory=list)
    improvement_possible: bool = True
    done: bool = False

    def __post_init__(self) -> None:
        self.finished = [Hypothesis((), NEG_INF, False, None) for _ in range(self.width)]

    @property
    def num_candidates(self) -> int:
        return max(2, 1 + len(self.eos_token_ids)) * self.width

    def ready(self) -> bool:
        return all(seq_id in self.candidates for seq_id, _ in self.running)

    def step(self, outputs: dict[int, list[int]]) -> list[BeamChoice]:
        """Advance one token. ``outputs``: each running beam's generated tokens so far."""
        width, k = self.width, self.num_candidates
        scored = []
        for beam, (seq_id, score) in enumerate(self.running):
            for token, logprob in self.candidates[seq_id]:
                scored.append((score + logprob, beam, token))
        # transformers ranks num_beams x vocab entries with topk; equal scores keep index order.
        scored.sort(key=lambda c: (-c[0], c[1], c[2]))
        top = scored[:k]
        self.candidates.clear()
        generated = len(outputs[self.running[0][0]]) + 1
        hits = [token in self.eos_token_ids or generated >= self.max_new_tokens for _, _, token in top]

        ranked = sorted(range(len(top)), key=lambda i: -(top[i][0] + (NEG_INF if hits[i] else 0.0)))[:width]
        choices = [BeamChoice(self.running[top[i][1]][0], top[i][2], top[i][0] + (NEG_INF if hits[i] else 0.0))
                   for i in ranked]

        all_full = all(h.finished for h in self.finished) and self.early_stopping is True
        new = []
        for rank, ((value, beam, token), hit) in enumerate(zip(top, hits)):
            score = value / (generated ** self.length_penalty)
            just_finished = hit and rank < width
            penalty = (NEG_INF if all_full else 0.0) + (0.0 if self.improvement_possible else NEG_INF) \
                + (0.0 if just_finished else NEG_INF)
            reason = ("stop" if token in self.eos_token_ids else "length") if just_finished else None
            new.append(Hypothesis((*outputs[self.running[beam][0]], token), score + penalty, just_finished, reason))
        merged = self.finished + new
        order = sorted(range(len(merged)), key=lambda i: -merged[i].score)[:width]
        self.finished = [merged[i] for i in order]

        self.running = [(c.parent_seq_id, c.score) for c in choices]
        self._update_early_stop(generated)
        exists_open = not (all(h.finished for h in self.finished) and self.early_stopping is True)
        self.done = not (self.improvement_possible and exists_open and not all(hits))
        return choices

    def _update_early_stop(self, generated: int) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0:
            best_length = self.max_new_tokens
        else:
            best_length = generated
        best_possible = self.running[0][1] / (best_length ** self.length_penalty)
        worst = min(h.score for h in self.finished)
        can_improve = any(best_possible > (worst if h.finished else NEG_INF) for h in self.finished)
        self.improvement_possible = self.improvement_possible and can_improve

    def results(self) -> list[Hypothesis]:
        """The best ``num_return`` hypotheses, best first."""
        return self.finished[: self.num_return]
