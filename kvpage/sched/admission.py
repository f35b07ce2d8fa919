"""Admission control: which waiting request may join the running batch now (pure Python).

Paging removes waste, not cache pressure: admit more requests than the pages
can grow into and the scheduler must preempt, and recomputing preempted work
can eat the throughput paging gained.  So admission has rules of its own,
checked in this order for the request at the head of the waiting queue:

1. ``max_num_seqs``: the batch has room for all of the request's samples;
2. ``admission_cap``: the pages the request will hold once admitted (its
   prompt; its whole reservation in the contiguous layouts or under the
   conservative policy) keep KV use at or below ``admission_cap`` of the
   cache;
3. the headroom policy: ``watermark`` leaves ``watermark`` of the pages
   free after admission for the running requests to grow into (as vLLM's
   block manager did); ``conservative`` counts every admitted request at
   its largest possible size (prompt + ``max_tokens``, every sample) and
   admits only while those promises fit, so no request is ever preempted for
   want of pages; ``none`` admits while pages last;
4. the pages themselves.

The headroom policies concern paging only: a contiguous reservation already
holds all the room its sequence can grow into.  The cap and the watermark
apply only while something is running, and a
request larger than the cap is refused at submission, so the queue never
stalls for good.  Each rule counts the requests it delayed (once per request
per rule), so an operator can see which one is binding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from kvpage.config import SchedulerConfig
from kvpage.kv import Claim, KVManager, PrefixHit
from kvpage.sched.events import EventLog
from kvpage.sched.sequence import Request, Sequence

DelayRule = Literal["max_num_seqs", "admission_cap", "headroom", "pages"]
DELAY_RULES: tuple[DelayRule, ...] = get_args(DelayRule)


@dataclass
class AdmissionCounters:
    """Requests delayed at least once by each rule."""

    max_num_seqs: int = 0
    admission_cap: int = 0
    headroom: int = 0
    pages: int = 0


def group_size(seq: Sequence) -> int:
    """Sequences a waiting sequence brings into the batch once admitted.

    Its pending parallel samples, or, for a beam search admitted for the
    first time, all its beams (they appear by forking within a step or two).
    """
    request = seq.request
    if request.beam is not None:
        return request.beam.width if request.admit_rank is None else 1
    return 1 + request.num_pending_forks


class AdmissionController:
    """Applies the admission rules and keeps the conservative policy's promises."""

    def __init__(self, config: SchedulerConfig, kv: KVManager, events: EventLog | None = None) -> None:
        self.config = config
        self.kv = kv
        self.events = events if events is not None else EventLog()
        self.counters = AdmissionCounters()
        self.promised_pages = 0  # conservative policy: pages promised to running sequences
        # seq_id (a beam search's request_id: its beams come and go) -> pages it carries in promised_pages
        self._promises: dict[int | str, int] = {}
        self._unit: dict[int, int] = {}  # seq_id -> pages promised for one sample of its request
        self._delayed: dict[str, set[DelayRule]] = {}  # request_id -> rules that already counted it
        num_pages = kv.num_pages
        self.cap_pages = int(config.admission_cap * num_pages + 1e-9)
        self.watermark_pages = math.ceil(config.watermark * num_pages - 1e-9)

    # ----- sizes -----------------------------------------------------------------------
    def full_tokens(self, num_prompt_tokens: int, max_new_tokens: int) -> int:
        """Slots a sequence can ever fill: the last generated token's K/V is never stored."""
        return num_prompt_tokens + max_new_tokens - 1

    def reservation_tokens(self, num_prompt_tokens: int, max_new_tokens: int) -> int | None:
        """Per-sequence contiguous reservation, or None when paging allocates on demand."""
        return self.kv.reservation_tokens(self.full_tokens(num_prompt_tokens, max_new_tokens))

    def claim(self, seq: Sequence, hit: PrefixHit, max_new_tokens: int) -> Claim:
        """What ``seq`` asks of the KV manager at admission: its prefix hit, its largest size, its samples."""
        return Claim(self.full_tokens(seq.num_prompt_tokens, max_new_tokens), group_size(seq), hit)

    def admission_pages(self, num_tokens: int, claim: Claim) -> int:
        """Pages a sequence group holds once admitted, for the cap (and, conservative, its promise).

        ``num_tokens`` is what must be computed now: the prompt, or prompt and
        output so far for a preempted sequence.
        """
        pages = self.kv.pages_for_tokens
        reservation = self.kv.reservation_tokens(claim.full_tokens)
        if reservation is not None:
            return pages(reservation) * claim.num_samples
        if self.config.headroom_policy == "conservative":
            return pages(claim.full_tokens) * claim.num_samples
        return pages(num_tokens) - claim.hit.num_tokens // self.kv.block_size

    def check_fits(self, num_prompt_tokens: int, max_new_tokens: int, n: int) -> None:
        """Refuse at submission what the cap or the layout would never admit."""
        needed = self.admission_pages(num_prompt_tokens, Claim(self.full_tokens(num_prompt_tokens, max_new_tokens), n))
        if needed > self.cap_pages:
            what = ("its reservations" if self.reservation_tokens(1, 1) is not None
                    or self.config.headroom_policy == "conservative" else "its prompt")
            raise ValueError(
                f"request needs {needed} KV pages for {what} ({n} sample(s), kv_layout {self.kv.layout!r}, "
                f"headroom_policy {self.config.headroom_policy!r}) but admission_cap {self.config.admission_cap} "
                f"allows {self.cap_pages} of {self.kv.num_pages}; lower max_tokens or n, "
                "or raise admission_cap / the KV cache")

    # ----- the rules -----------------------------------------------------------------
    def blocking_rule(self, seq: Sequence, claim: Claim, num_new: int, num_running: int) -> DelayRule | None:
        """The cap or headroom rule that keeps ``seq`` waiting now (counted), or None."""
        if not num_running:
            return None
        kv = self.kv
        wanted = self.admission_pages(len(seq.token_ids), claim)
        policy = self.config.headroom_policy
        committed = max(kv.num_pages_in_use, self.promised_pages) if policy == "conservative" \
            else kv.num_pages_in_use
        if self.cap_pages < kv.num_pages and committed + wanted > self.cap_pages:
            return self.delay(seq, "admission_cap")
        if kv.reservation_tokens(claim.full_tokens) is not None:
            return None  # a contiguous reservation already covers all the growth: no headroom to keep
        if policy == "conservative" and self.promised_pages + wanted > kv.num_pages:
            return self.delay(seq, "headroom")
        if policy == "watermark":
            needed_now = kv.pages_needed(seq.seq_id, num_new, claim)
            if kv.num_available_pages - needed_now < self.watermark_pages:
                return self.delay(seq, "headroom")
        return None

    def delay(self, seq: Sequence, rule: DelayRule) -> DelayRule:
        """Count ``seq``'s request as delayed by ``rule`` (once per request and rule)."""
        seen = self._delayed.setdefault(seq.request.request_id, set())
        if rule not in seen:
            seen.add(rule)
            setattr(self.counters, rule, getattr(self.counters, rule) + 1)
            self.events.delayed(seq.request.request_id, rule)
        return rule

    # ----- the conservative policy's promises -------------------------------------------
    def on_admit(self, seq: Sequence, max_new_tokens: int) -> None:
        self._delayed.pop(seq.request.request_id, None)
        if self.config.headroom_policy != "conservative":
            return
        pages = self.kv.pages_for_tokens(self.full_tokens(seq.num_prompt_tokens, max_new_tokens))
        if seq.request.beam is not None:  # one promise for all the beams, kept until the search ends
            if seq.request.request_id not in self._promises:
                self._promise(seq.request.request_id, pages * seq.request.beam.width)
            return
        self._unit[seq.seq_id] = pages
        self._promise(seq.seq_id, pages * group_size(seq))

    def on_fork(self, parent: Sequence, child: Sequence) -> None:
        """A forked sample takes its share of the parent's promise."""
        share = self._unit.get(parent.seq_id, 0)
        if share:
            self._promises[parent.seq_id] -= share  # moved, not added: the total stays
            self._unit[child.seq_id] = share
            self._promises[child.seq_id] = share

    def on_release(self, seq: Sequence) -> None:
        """The sequence left the running batch (finished, aborted or preempted)."""
        self.promised_pages -= self._promises.pop(seq.seq_id, 0)
        self._unit.pop(seq.seq_id, None)

    def on_request_done(self, request: Request) -> None:
        """Every sequence of the request has finished."""
        self.promised_pages -= self._promises.pop(request.request_id, 0)
        self._delayed.pop(request.request_id, None)

    def _promise(self, key: int | str, pages: int) -> None:
        self._promises[key] = self._promises.get(key, 0) + pages
        self.promised_pages += pages

    def reserved_pages(self) -> int:
        """Pages promised but not yet allocated (the conservative policy's reservation waste)."""
        return max(0, self.promised_pages - self.kv.num_pages_in_use)
