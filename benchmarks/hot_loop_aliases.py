"""Do the scheduler's local-alias micro-optimizations pay?  The hot loops with and without them, side by side.

``Scheduler.schedule``, ``StepResults.commit`` and ``StepResults.resolve``
bind attributes they read for every sequence (``self.running``,
``kv.allocate``, ``life.counters``, ...) to locals before their loop.  This
runs ``--batch`` decoding sequences through ``--steps`` schedule / commit /
resolve steps with the shipped code, and with the same loops written
without the aliases (below), alternating ``--rounds`` times in one
process, and prints the time per step of each and their ratio.

    python benchmarks/hot_loop_aliases.py [--batch 256] [--steps 200] [--rounds 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import types

from kvpage.config import SchedulerConfig
from kvpage.kv import KVCacheManager
from kvpage.sampling_params import SamplingParams
from kvpage.sched import Request, Scheduler
from kvpage.sched.draft import StepDraft
from kvpage.sched.results import StepResults
from kvpage.step_io import SampledToken, SchedulerOutput


# ----- the same loops without local aliases: what the shipped code would read like ---------------
def schedule_plain(self: Scheduler) -> SchedulerOutput:
    step = StepDraft(budget=self.config.max_num_batched_tokens)
    i = 0
    while i < len(self.running) and step.budget > 0:
        seq = self.running[i]
        num_new = min(seq.compute_target - seq.num_computed_tokens, step.budget)
        if num_new <= 0:
            i += 1
            continue
        copies = self.kv.allocate(seq.seq_id, num_new)
        assert copies is not None  # the benchmark never runs out of pages
        step.add(self._scheduled(seq, num_new), copies)
        i += 1
    if not step.preempted:
        self._admit(step, ahead_of=self._swap_in(step))
    return step.output(self.life.take_finished())


def commit_plain(self: StepResults, out: SchedulerOutput) -> None:
    for scheduled in out.sequences:
        seq = self.life.queues.live.get(scheduled.seq_id)
        if seq is None:
            continue
        start = seq.num_computed_tokens
        num_new = len(scheduled.input_token_ids)
        computed = seq.num_computed_tokens = start + num_new
        self.life.counters.num_tokens_computed += num_new
        if start < seq.max_computed_tokens:
            self.life.counters.num_recomputed_tokens += min(computed, seq.max_computed_tokens) - start
        seq.max_computed_tokens = max(seq.max_computed_tokens, computed)
        if start < seq.num_prompt_tokens:
            self.life.counters.num_prompt_tokens_computed += min(computed, seq.num_prompt_tokens) - start
        self.life.kv.commit(seq.seq_id, seq.token_ids, computed)
        if seq.request.num_pending_forks and computed == seq.compute_target:
            self.life.fork_samples(seq)
        if scheduled.sample and seq.request.beam is None:
            seq.num_inflight_tokens += 1
            if self.life.limit.reached(seq, len(seq.token_ids) + seq.num_inflight_tokens):
                seq.last_token_inflight = True


def resolve_plain(self: StepResults, out: SchedulerOutput, sampled: list[SampledToken]) -> list[object]:
    samples = iter(sampled)
    touched: list[object] = []
    for scheduled in out.sequences:
        if not scheduled.sample:
            continue
        token = next(samples)
        seq = self.life.queues.live.get(scheduled.seq_id)
        if seq is None:
            continue
        if seq.request.beam is not None:
            continue  # (no beams in this benchmark)
        seq.num_inflight_tokens -= 1
        seq.append_token(token.token_id, token.logprobs)
        if len(seq.token_ids) % self.life.kv.block_size == 0 and seq.num_computed_tokens >= len(seq.token_ids):
            self.life.kv.index_full_pages(seq.seq_id, seq.token_ids)
        self.life.counters.num_generated_tokens += 1
        touched.append(seq)
        self._check_token_stop(seq, token.token_id)
    return touched


def decoding_scheduler(batch: int) -> Scheduler:
    kv = KVCacheManager(batch * 80, 16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=1 << 20), kv, 8192,
                      eos_token_ids=())
    params = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
    for i in range(batch):
        sched.add_request(Request(f"r{i}", None, [3 + (i * 7 + j) % 1000 for j in range(64)], params, float(i)))
    out = sched.schedule()  # every prompt at once
    sched.update(out, [SampledToken(5) for s in out.sequences if s.sample])
    return sched


def time_steps(sched: Scheduler, steps: int, plain: bool) -> float:
    schedule = types.MethodType(schedule_plain, sched) if plain else sched.schedule
    commit = types.MethodType(commit_plain, sched.results) if plain else sched.results.commit
    resolve = types.MethodType(resolve_plain, sched.results) if plain else sched.results.resolve
    start = time.perf_counter()
    for _ in range(steps):
        out = schedule()
        commit(out)
        resolve(out, [SampledToken(5)] * len(out.sequences))
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(args.rounds):
        for plain in (False, True) if round_ % 2 == 0 else (True, False):
            times[plain].append(time_steps(decoding_scheduler(args.batch), args.steps, plain))
    shipped, plain = statistics.median(times[False]), statistics.median(times[True])
    print(f"python {platform.python_version()} on {platform.machine()}; batch {args.batch}, {args.steps} decode steps, "
          f"median of {args.rounds} rounds")
    print(f"with aliases {shipped * 1e3:.3f} ms a step, without {plain * 1e3:.3f} ms; "
          f"without / with = {plain / shipped:.3f}")


if __name__ == "__main__":
    main()
