"""Seeded synthetic workloads: request lengths, token ids and arrival times.

Used by ``kvpage bench`` (memory-layout benchmark) and by the trace planner,
which runs without torch, so this module uses the standard library only.

Workloads (``WorkloadSpec.name``):

``sharegpt``
    Long-tailed chat lengths like ShareGPT: lognormal prompt and output
    lengths with means of 161 and 338 tokens before clipping, the ShareGPT
    means used by the PagedAttention paper (Kwon et al., SOSP 2023).
    Sigma is 1.0 for prompts and 0.8 for outputs, so a few requests are
    many times the mean, which is what makes a contiguous max-length
    reservation wasteful. Means measured after clipping (10,000 requests,
    seeds 0-2): max_model_len=1024: 144-146 prompt / 312-313 output tokens;
    max_model_len=2048: 155-158 / 332-337 (unclipped: 160 / 335).
``alpaca``
    Short instruction lengths like Alpaca: lognormal, means 19 prompt and 58
    output tokens (the Alpaca means of the same paper), sigma 0.6: a narrow
    distribution where many short sequences share memory. Clipping never
    bites at max_model_len >= 1024 (measured means 19.0 / 57.7-58.2).
``uniform``
    Prompt and output each uniform in [max_model_len // 16, max_model_len // 4]:
    no tail, a control to tell length skew apart from plain load.
``long-single``
    Exactly one request (``num_requests`` is ignored): a prompt of
    max_model_len // 2 tokens and an output filling the rest, so prompt +
    output == max_model_len. One request that alone fills its reservation
    is the case where paging gains nothing over contiguous allocation.
``shared-prefix-chat``
    Chat sessions behind one system prompt: every request starts with the
    same max_model_len // 4 token ids (prefix_group=0), so prefix caching can
    share those pages; then a per-request user part (lognormal, mean 40,
    sigma 0.8) and an output (lognormal, mean 120, sigma 0.8). Measured
    output mean after clipping: 118-120 at max_model_len 1024 and 2048.

Clipping, so that every request has prompt >= 1, output >= 1 and prompt +
output <= max_model_len: a sampled length is rounded and raised to at least
1; the prompt is cut to max_model_len // 2 (for shared-prefix-chat the user
part is cut so the whole prompt fits in that half); then the output is cut to
max_model_len - prompt. Keeping the prompt within half the context leaves
room for a real output instead of a 1-token tail after a huge prompt.

Arrivals: with ``request_rate=None`` all requests arrive at t=0. Otherwise
the first request arrives at t=0 (a benchmark should not open with idle
time) and each later one after a gamma gap of shape ``burstiness`` and scale
1 / (request_rate * burstiness): the mean gap is 1 / request_rate whatever
the shape, burstiness 1.0 is a Poisson process and smaller values are
burstier (coefficient of variation 1 / sqrt(burstiness)).

Determinism: everything comes from ``random.Random(spec.seed)``, never the
global generator. Lengths, token ids and arrival gaps are drawn from three
separate child streams, so changing ``vocab_size`` or ``request_rate`` keeps
the lengths, and a workload of k requests is the first k of a larger one.
Prompt token ids are uniform in [first_token_id, vocab_size), so special
tokens (bos/eos/pad) never appear inside a prompt.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from kvpage.validation import is_int, is_positive_number, one_of, require

WORKLOAD_NAMES: tuple[str, ...] = ("sharegpt", "alpaca", "uniform", "long-single", "shared-prefix-chat")

# (mean, sigma) of the lognormal length distributions, before clipping.
_SHAREGPT_PROMPT = (161.0, 1.0)
_SHAREGPT_OUTPUT = (338.0, 0.8)
_ALPACA_PROMPT = (19.0, 0.6)
_ALPACA_OUTPUT = (58.0, 0.6)
_CHAT_USER = (40.0, 0.8)
_CHAT_OUTPUT = (120.0, 0.8)


@dataclass(frozen=True)
class WorkloadRequest:
    """One request: its prompt ids, how much to generate and when it arrives."""

    prompt_token_ids: tuple[int, ...]
    output_tokens: int  # exact number of tokens to generate (the bench uses ignore_eos)
    arrival_time: float = 0.0  # seconds from the start
    n: int = 1  # parallel samples
    prefix_group: int | None = None  # requests of one group share their first shared_prefix_tokens tokens
    shared_prefix_tokens: int = 0
    beam_width: int = 0  # > 0: a beam search of this width instead of sampling
    priority: int = 0  # lower runs first, as in SamplingParams-level priority


@dataclass(frozen=True)
class Workload:
    """A named, ordered tuple of requests (ordered by arrival time)."""

    name: str
    description: str
    requests: tuple[WorkloadRequest, ...]

    @property
    def total_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def total_output_tokens(self) -> int:
        """Output tokens per sample, summed over requests (not multiplied by ``n``)."""
        return sum(r.output_tokens for r in self.requests)

    @property
    def mean_prompt_tokens(self) -> float:
        return self.total_prompt_tokens / len(self.requests) if self.requests else 0.0

    @property
    def mean_output_tokens(self) -> float:
        return self.total_output_tokens / len(self.requests) if self.requests else 0.0


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate; validated on construction so a bad CLI value fails early."""

    name: str
    num_requests: int = 64
    seed: int = 0
    vocab_size: int = 4096
    max_model_len: int = 1024
    first_token_id: int = 3  # ids below this are special tokens (bos/eos/pad): never emitted in prompts
    request_rate: float | None = None  # None: all arrive at t=0; else mean rate (req/s)
    burstiness: float = 1.0  # gamma shape of inter-arrival gaps; 1.0 = Poisson, < 1 burstier
    n: int = 1

    def __post_init__(self) -> None:
        one_of("name", self.name, WORKLOAD_NAMES)
        require(is_int(self.num_requests) and self.num_requests >= 1, "num_requests", self.num_requests,
                "an integer >= 1")
        require(is_int(self.seed), "seed", self.seed, "an integer")
        require(is_int(self.first_token_id) and self.first_token_id >= 0, "first_token_id",
                self.first_token_id, "an integer >= 0")
        # At least two usable ids, so prompts are not a single repeated token.
        require(is_int(self.vocab_size) and self.vocab_size > self.first_token_id + 1, "vocab_size",
                self.vocab_size, f"an integer > first_token_id + 1 = {self.first_token_id + 1}")
        # 16 keeps max_model_len // 16 >= 1, so every workload has room for 1-token prompts and outputs.
        require(is_int(self.max_model_len) and self.max_model_len >= 16, "max_model_len", self.max_model_len,
                "an integer >= 16")
        require(self.request_rate is None or is_positive_number(self.request_rate), "request_rate",
                self.request_rate, "None or a finite number > 0")
        require(is_positive_number(self.burstiness), "burstiness", self.burstiness, "a finite number > 0")
        require(is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")


def _lognormal_len(rng: random.Random, mean: float, sigma: float) -> int:
    # E[lognormal(mu, sigma)] = exp(mu + sigma^2 / 2), so this mu gives the wanted mean.
    mu = math.log(mean) - sigma * sigma / 2
    return max(1, round(rng.lognormvariate(mu, sigma)))


def _fit(prompt: int, output: int, max_model_len: int) -> tuple[int, int]:
    """Apply the clipping policy of the module docstring."""
    prompt = min(prompt, max_model_len // 2)
    return prompt, min(output, max_model_len - prompt)


def _sample_lengths(spec: WorkloadSpec, rng: random.Random) -> tuple[str, list[tuple[int, int]], int]:
    """(description, [(prompt_len, output_len)], shared prefix length) of the workload."""
    length = spec.max_model_len
    if spec.name in ("sharegpt", "alpaca"):
        label, prompt_dist, output_dist = (("ShareGPT", _SHAREGPT_PROMPT, _SHAREGPT_OUTPUT)
                                           if spec.name == "sharegpt" else ("Alpaca", _ALPACA_PROMPT, _ALPACA_OUTPUT))
        lengths = [_fit(_lognormal_len(rng, *prompt_dist), _lognormal_len(rng, *output_dist), length)
                   for _ in range(spec.num_requests)]
        return (f"{label}-like lengths: lognormal, mean {prompt_dist[0]:g} prompt / {output_dist[0]:g} output "
                f"tokens before clipping to max_model_len={length}"), lengths, 0
    if spec.name == "uniform":
        low, high = length // 16, length // 4
        lengths = [(rng.randint(low, high), rng.randint(low, high)) for _ in range(spec.num_requests)]
        return f"prompt and output uniform in [{low}, {high}] tokens", lengths, 0
    if spec.name == "long-single":
        prompt = length // 2
        description = f"one request: {prompt} prompt + {length - prompt} output tokens = max_model_len"
        return description, [(prompt, length - prompt)], 0
    # shared-prefix-chat
    system = length // 4
    lengths = []
    for _ in range(spec.num_requests):
        user = min(_lognormal_len(rng, *_CHAT_USER), length // 2 - system)
        lengths.append(_fit(system + user, _lognormal_len(rng, *_CHAT_OUTPUT), length))
    return (f"chat behind a shared {system}-token system prompt: user part mean {_CHAT_USER[0]:g}, output mean "
            f"{_CHAT_OUTPUT[0]:g} tokens (lognormal, before clipping)"), lengths, system


def _arrival_times(spec: WorkloadSpec, count: int, rng: random.Random) -> list[float]:
    if spec.request_rate is None:
        return [0.0] * count
    # Gamma(shape k, scale 1/(rate*k)) has mean 1/rate for every k; only the spread changes.
    scale = 1.0 / (spec.request_rate * spec.burstiness)
    times, now = [0.0], 0.0
    for _ in range(count - 1):
        now += rng.gammavariate(spec.burstiness, scale)
        times.append(now)
    return times


def make_workload(spec: WorkloadSpec) -> Workload:
    """Generate the workload ``spec`` describes; the same spec always gives the same workload."""
    master = random.Random(spec.seed)
    # Separate streams so a change to vocab_size or request_rate leaves the lengths as they were.
    length_rng = random.Random(master.getrandbits(64))
    token_rng = random.Random(master.getrandbits(64))
    arrival_rng = random.Random(master.getrandbits(64))

    description, lengths, shared = _sample_lengths(spec, length_rng)
    vocab = range(spec.first_token_id, spec.vocab_size)
    # choices() draws exactly one random() per token, keeping the stream prefix-stable, and is fast.
    prefix = tuple(token_rng.choices(vocab, k=shared))
    arrivals = _arrival_times(spec, len(lengths), arrival_rng)
    requests = tuple(
        WorkloadRequest(
            prompt_token_ids=prefix + tuple(token_rng.choices(vocab, k=prompt_len - shared)),
            output_tokens=output_len,
            arrival_time=arrival,
            n=spec.n,
            prefix_group=0 if shared else None,
            shared_prefix_tokens=shared,
        )
        for (prompt_len, output_len), arrival in zip(lengths, arrivals)
    )
    return Workload(name=spec.name, description=description, requests=requests)
