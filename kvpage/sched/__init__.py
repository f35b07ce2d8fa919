"""Scheduling: which sequences run each step, and what happens to them (pure Python, no torch).

One request's path through the package, in order:

* :mod:`~kvpage.sched.sequence`: the :class:`Request` a caller submits and
  the :class:`Sequence` objects that run it, with their states and the
  allowed transitions;
* :mod:`~kvpage.sched.lifecycle`: submission (refusing what could never
  fit), admission, forks, preemption, swap-in, finishing: each event and its
  effect on pages, promises and counters; :mod:`~kvpage.sched.queues`, the
  only writer of statuses and queue membership, and
  :mod:`~kvpage.sched.limits`, the length rule;
* :mod:`~kvpage.sched.scheduler`: each step's schedule: continuous
  batching, chunked prefill, priorities, preemption, swap-in, admission
  (its rules: :mod:`~kvpage.sched.admission`; whom to preempt and how:
  :mod:`~kvpage.sched.preemption`), into a :class:`~kvpage.sched.draft.StepDraft`;
* :mod:`~kvpage.sched.results`: a step's results: computed K/V, sampled
  tokens, token stops; beam searches advance in :mod:`~kvpage.sched.beam_search`
  (their algorithm: :mod:`~kvpage.sched.beam`); prompt logprobs, the prompt
  positions each step scores and the prefix-cache rule that goes with them, in
  :mod:`~kvpage.sched.prompt_logprobs`;
* :mod:`~kvpage.sched.step_loop`: the step order, synchronous or
  asynchronous, against an executor: the engine's model runner or the
  planner's virtual device;
* :mod:`~kvpage.sched.pressure`: waste and thrashing signals over a run.
"""

from kvpage.sched.lifecycle import SchedulerCounters
from kvpage.sched.scheduler import Scheduler
from kvpage.sched.sequence import Request, RequestTimes, Sequence, SequenceStatus
from kvpage.sched.step_loop import Executor, StepLoop

__all__ = ["Executor", "Request", "RequestTimes", "Scheduler", "SchedulerCounters", "Sequence", "SequenceStatus",
           "StepLoop"]
