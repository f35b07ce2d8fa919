"""Layout shadows: a contiguous layout's figures from a paged replay, while the two schedules provably agree.

The planner compares layouts by replaying the trace under each (see
:func:`kvpage.plan.sweep.layout_savings`).  Often the replays differ only
in their memory figures: while every layout admits each request at the
same step and nothing is shared, preempted or kept waiting, the scheduler
plans the same steps whatever the layout, so the steps take the same
time and only the KV manager's state differs.

A :class:`LayoutShadow` is such a contiguous layout's KV manager and
admission rules (the same classes the scheduler builds), run beside the
paged replay as a :class:`~kvpage.sched.lifecycle.LifecycleObserver`:

* every admission of the paged replay is also made in the shadow: its
  claim, its blocking rules and its first-fit reservation.  If the shadow
  would have refused or delayed it, the schedules part, and the shadow is
  *broken*;
* every finish gives the shadow's reservation and promise back;
* its pages in use are summed over the paged replay's recorded steps, as
  they change.  With nothing shared, a paged step's stored slots and
  unshared pages are exactly the contiguous layout's stored tokens and
  touched pages (:meth:`~kvpage.kv.KVManager.waste_given`), so the paged
  replay's sums of those and the shadow's sum of pages in use give the
  layout's slot sums by kind, and :meth:`~kvpage.sched.pressure.WasteStats.means`
  its means: the same integers a full replay sums, at no cost a step.

It breaks, too, at anything that would make the schedules part: a prefix
hit (paging computes less), a fork (``n > 1`` or a beam search), a
preemption, a request left waiting at the end of a step (its admission may
differ, and external fragmentation depends on it).  A broken shadow is
dropped and the layout replayed in full, so the comparison's figures are
the full replays' in every case; tests/test_plan_shadow.py checks that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvpage.config import SchedulerConfig
from kvpage.kv import PrefixHit, make_kv_manager
from kvpage.modes import KVLayout
from kvpage.sched import Sequence
from kvpage.sched.admission import AdmissionController
from kvpage.sched.pressure import WasteStats


@dataclass
class ShadowResult:
    """What a shadow measured: the waste means of its layout (:meth:`WasteStats.means`), or why it broke."""

    layout: KVLayout
    waste: dict[str, float] | None
    broken: str | None


class LayoutShadow:
    """A contiguous layout's KV manager and admission, following a paged replay's admissions and finishes."""

    def __init__(self, layout: KVLayout, config: SchedulerConfig, num_pages: int, block_size: int,
                 max_model_len: int, paged: WasteStats, steps_taken: Callable[[], int]) -> None:
        if layout == "paged":
            raise ValueError("a layout shadow follows a paged replay: give a contiguous layout")
        self.layout = layout
        self.kv = make_kv_manager(layout, num_pages, block_size, max_model_len)
        self.admission = AdmissionController(config, self.kv)
        self.paged = paged  # the paged replay's step sums
        self.steps_taken = steps_taken  # the paged replay's steps so far (recorded, or buffered by a decode run)
        self.broken: str | None = None
        self.pages_in_use_sum = 0  # over the paged replay's recorded steps, up to self._summed of them
        self._fits: set[tuple[int, int]] = set()  # (prompt, max new tokens) the layout admits
        self._summed = 0

    def _sum_up(self) -> None:
        """Add the pages in use to the sum for the steps recorded since the last change."""
        recorded = self.steps_taken()
        self.pages_in_use_sum += self.kv.num_pages_in_use * (recorded - self._summed)
        self._summed = recorded

    def admitted(self, seq: Sequence, hit: PrefixHit, max_new_tokens: int, num_new_tokens: int,
                 num_running: int) -> None:
        if self.broken is not None:
            return
        request = seq.request
        if hit.num_tokens:
            self.broken = "a prefix-cache hit (paging computed less)"
        elif request.beam is not None or request.sampling_params.n > 1:
            self.broken = "a request forks (n > 1 or a beam search)"
        elif seq.num_preemptions:
            self.broken = "a preempted sequence came back"
        if self.broken is not None:
            return
        size = (seq.num_prompt_tokens, max_new_tokens)
        if size not in self._fits:  # asked once per size: most requests share theirs with an earlier one
            try:
                self.admission.check_fits(*size, 1)
            except ValueError as exc:
                self.broken = f"the layout refuses a request: {exc}"
                return
            self._fits.add(size)
        self._sum_up()
        claim = self.admission.claim(seq, PrefixHit(), max_new_tokens)
        rule = self.admission.blocking_rule(seq, claim, num_new_tokens, num_running)
        if rule is not None or self.kv.allocate(seq.seq_id, num_new_tokens, claim) is None:
            self.broken = f"the layout would have delayed an admission ({rule or 'no hole fits'})"
            return
        self.admission.on_admit(seq, max_new_tokens)

    def finished(self, seq: Sequence) -> None:
        if self.broken is not None:
            return
        self._sum_up()
        self.kv.free(seq.seq_id)
        self.admission.on_release(seq)
        if seq.request.is_finished:
            self.admission.on_request_done(seq.request)

    def result(self, num_preemptions: int) -> ShadowResult:
        """The layout's step means, as its own replay's :class:`WasteStats` would give them, or why it broke.

        ``kv_waste_of_used_mean`` is left out: a share per step, it cannot
        be had from sums.
        """
        paged = self.paged
        if self.broken is None and paged.num_loaded_samples:
            self.broken = "a request waited at the end of a step"
        if self.broken is None and num_preemptions:
            self.broken = "a preemption"
        if self.broken is not None:
            return ShadowResult(self.layout, None, self.broken)
        self._sum_up()
        bs = self.kv.block_size
        stored, unshared = paged.slot_sums[0], paged.unshared_pages_sum
        last = None if paged.last is None else self.kv.waste_given(paged.last.stored_slots,
                                                                    paged.last.pages_without_sharing)
        stats = WasteStats(num_samples=paged.num_samples, total_slots=paged.total_slots,
                           slot_sums=[stored, unshared * bs - stored, (self.pages_in_use_sum - unshared) * bs, 0],
                           unshared_pages_sum=self.pages_in_use_sum, batch_size_sum=paged.batch_size_sum,
                           max_batch_size=paged.max_batch_size)
        stats.last = last
        means = stats.means()
        del means["kv_waste_of_used_mean"]
        return ShadowResult(self.layout, means, None)
