"""The scheduler and memory manager under random memory pressure, with a fake model that reads the pages.

:class:`PageTracingRunner` plays the model runner's part in pure Python: it
performs each step's swaps and page copies on a simulated cache that stores
token ids instead of K/V, writes every scheduled token into its page slot,
and checks that every sequence it samples finds exactly its own tokens in
its page table.  Its "logits" are a hash of those tokens, so outputs are a
function of the cache's contents: a run squeezed into few pages, with
preemption, swap and copy-on-write, must produce the outputs of a run with
room to spare, finish in bounded steps (no livelock), and free every page.
"""

from __future__ import annotations

import random
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from kvpage.config import SchedulerConfig
from kvpage.kv import make_kv_manager
from kvpage.sampling_params import SamplingParams
from kvpage.sched.scheduler import Scheduler
from kvpage.sched.sequence import Request
from kvpage.step_io import SampledToken, SchedulerOutput

EOS = 2
VOCAB = 24
MAX_MODEL_LEN = 64


class PageTracingRunner:
    """A model runner whose cache holds token ids, and whose next-token scores hash what the pages hold."""

    def __init__(self, num_pages: int, block_size: int, num_host_pages: int) -> None:
        self.block_size = block_size
        self.device: list[list[int | None]] = [[None] * block_size for _ in range(num_pages)]
        self.host: list[list[int | None]] = [[None] * block_size for _ in range(num_host_pages)]

    def run(self, out: SchedulerOutput) -> list[SampledToken]:
        for ops in out.page_ops:
            src, dst = {"swap_out": (self.device, self.host), "swap_in": (self.host, self.device),
                        "copy": (self.device, self.device)}[ops.kind]
            for a, b in ops.pairs:
                dst[b] = list(src[a])
        sampled = []
        for seq in out.sequences:
            for offset, token in enumerate(seq.input_token_ids):
                position = seq.start_position + offset
                self.device[seq.page_ids[position // self.block_size]][position % self.block_size] = token
            if not seq.sample:
                continue
            end = seq.start_position + len(seq.input_token_ids)
            seen = [self.device[seq.page_ids[p // self.block_size]][p % self.block_size] for p in range(end)]
            assert seen == seq.all_token_ids[:end], f"sequence {seq.seq_id} reads another's K/V"
            sampled.append(self._scores(seen, seq.sampling_params))
        return sampled

    @staticmethod
    def _scores(tokens: list[int | None], params: SamplingParams) -> SampledToken:
        rng = random.Random(zlib.crc32(repr(tokens).encode()))
        if not params.use_beam_search:
            return SampledToken(rng.randrange(3, VOCAB))
        ranked = rng.sample(range(2, VOCAB), 2 * params.beam_width)  # type: ignore[operator]
        logprobs = sorted((-rng.random() * 4 for _ in ranked), reverse=True)
        return SampledToken(ranked[0], beam_candidates=list(zip(ranked, logprobs)))


request_specs = st.lists(st.tuples(
    st.integers(1, 30),  # prompt length
    st.integers(1, 12),  # max_tokens
    st.sampled_from([("beam", 1), ("beam", 2), ("beam", 3), ("beam", 4), ("sample", 1), ("sample", 3)]),
    st.integers(0, 1),  # priority
    st.integers(0, 3),  # which of a few shared prompt stems
), min_size=1, max_size=6)


def run(specs: list[tuple[int, int, tuple[str, int], int, int]], layout: str, num_pages: int, block_size: int,
        mode: str, num_host_pages: int, max_num_seqs: int, headroom: str = "none",
        caching: bool = True) -> dict[str, list[tuple[int, ...]]]:
    kv = make_kv_manager(layout, num_pages, block_size, MAX_MODEL_LEN, enable_prefix_caching=caching,
                         num_swap_pages=num_host_pages)
    config = SchedulerConfig(preemption_mode=mode, headroom_policy=headroom, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=32, watermark=0.1)
    sched = Scheduler(config, kv, MAX_MODEL_LEN, eos_token_ids=(EOS,))
    runner = PageTracingRunner(num_pages, block_size, num_host_pages)
    requests = []
    for i, (prompt_len, max_tokens, (kind, width), priority, stem) in enumerate(specs):
        prompt = [3 + (stem * 7 + j) % (VOCAB - 3) for j in range(prompt_len)]
        params = (SamplingParams(n=min(2, width), use_beam_search=True, beam_width=width, max_tokens=max_tokens,
                                 temperature=0, length_penalty=0.5)
                  if kind == "beam" else SamplingParams(n=width, max_tokens=max_tokens, temperature=0))
        requests.append(Request(f"r{i}", None, prompt, params, arrival_time=float(i), priority=priority))
        sched.add_request(requests[-1])
    for _ in range(5000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        sched.update(out, runner.run(out))
    assert not sched.has_unfinished(), "no progress: the scheduler livelocked or deadlocked"
    assert kv.num_pages_in_use == 0
    if layout == "paged":
        assert kv.swap_space.num_free_pages == num_host_pages
    if headroom == "conservative":
        assert sched.counters.num_preemptions == 0 and sched.admission.promised_pages == 0
    return {r.request_id: [h.token_ids for h in r.beam.results()] if r.beam is not None
            else [tuple(s.output_token_ids) for s in r.sequences] for r in requests}


@settings(max_examples=200, deadline=None)
@given(specs=request_specs, layout=st.sampled_from(["paged", "paged", "contiguous-request"]),
       block_size=st.sampled_from([1, 2, 4, 8]), spare=st.integers(0, 40),
       mode=st.sampled_from(["recompute", "swap"]), num_host_pages=st.integers(0, 24),
       max_num_seqs=st.integers(4, 16), headroom=st.sampled_from(["none", "none", "watermark", "conservative"]),
       caching=st.booleans())
def test_squeezed_runs_equal_roomy_runs_and_always_finish(specs: list[tuple[int, int, tuple[str, int], int, int]],
                                                          layout: str, block_size: int, spare: int, mode: str,
                                                          num_host_pages: int, max_num_seqs: int, headroom: str,
                                                          caching: bool) -> None:
    specs = [s for s in specs if s[2][1] <= max_num_seqs]
    # Just enough pages for the largest single sequence, plus a few.
    largest = max((p + m - 1 for p, m, *_ in specs), default=1)
    num_pages = -(-largest // block_size) + spare // block_size
    if layout != "paged" or headroom == "conservative":  # these must fit a whole group's reservations
        num_pages = max(num_pages, max(-(-(p + m - 1) // block_size) * w for p, m, (_, w), *_ in specs))
    squeezed = run(specs, layout, num_pages, block_size, mode, num_host_pages, max_num_seqs, headroom, caching)
    roomy = run(specs, "paged", 4096, block_size, "recompute", 0, 64)
    assert squeezed == roomy
