"""``kvpage bench --calibrate``: measure the real engine's step time and fit the planner's cost model.

The engine runs a grid of batch shapes on the local device: for each batch
size and context length, that many requests of that many prompt tokens
arrive at once and decode a few tokens.  Every step is timed whole (wall
clock around ``LLMEngine.step``, which waits for the device), and its
shape (sequences, tokens, K/V read, ...) is read from the step it ran
(with asynchronous scheduling, the step the call completed).
:meth:`~kvpage.plan.cost.CalibratedCostModel.fit` turns the samples into
the linear model that ``kvpage plan --cost-model FILE`` uses.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from kvpage.bench.clock import StepClock
from kvpage.kv.format import kv_format
from kvpage.llm import LLM
from kvpage.plan.cost import CalibratedCostModel, StepShape
from kvpage.plan.replay import step_shape
from kvpage.sampling_params import RequestOutputKind, SamplingParams


@dataclass(frozen=True)
class CalibrationGrid:
    batch_sizes: tuple[int, ...] = (1, 4, 16, 48)
    contexts: tuple[int, ...] = (16, 128, 480, 900)  # capped to max_model_len - decode_steps
    # Tokens each request decodes; None: 32 on a GPU, 8 on a CPU. On a GPU a small model's step is
    # host time, and with short requests their finishing steps (building the outputs) are most of
    # the samples: an H200 calibration fitted its steps to 14% and mispredicted TPOT by 26-43%
    # with 8, to 5% and within 3% with 32. On a CPU the model dominates, and 8 keeps it short.
    decode_steps: int | None = None
    repeats: int = 2  # the whole grid, for more samples of each shape

    def rounds(self, max_context: int, rng: random.Random) -> list[tuple[list[int], int]]:
        """Each round: prompt lengths, and how many of them arrive late, once the others decode.

        Every batch size at every context, all at once; then at mixed
        contexts with half arriving late, so that prefill chunks share steps
        with decodes as they do under a stream of arrivals.
        """
        contexts = sorted({min(c, max_context) for c in self.contexts})
        rounds = [([c] * b, 0) for b in self.batch_sizes for c in contexts]
        rounds += [([rng.randint(contexts[0], contexts[-1]) for _ in range(b)], b // 2)
                   for b in self.batch_sizes if b > 1]
        return rounds


def measure_steps(llm: LLM, grid: CalibrationGrid, seed: int = 0,
                  clock: StepClock | None = None) -> list[tuple[StepShape, float]]:
    """Run the grid; returns (shape, seconds) for every step: wall-clock seconds, or ``clock``'s."""
    engine = llm.engine
    bytes_per_page = engine.cache_shape.bytes_per_page
    vocab = engine.model_config.vocab_size
    rng = random.Random(seed)
    decode_steps = grid.decode_steps or (32 if engine.device.type == "cuda" else 8)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=decode_steps,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    samples = []
    rounds = grid.rounds(engine.max_model_len - decode_steps, rng)
    for repeat in range(grid.repeats + 1):  # the first pass warms up and is not kept
        for lengths, late in rounds if repeat else rounds[:2]:
            prompts = [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]
            for prompt in prompts[: len(prompts) - late]:
                engine.add_request(None, {"prompt_token_ids": prompt}, params)
            step = 0
            while engine.has_unfinished_requests():
                step += 1
                if step == 3:
                    for prompt in prompts[len(prompts) - late:]:
                        engine.add_request(None, {"prompt_token_ids": prompt}, params)
                before = engine.last_step
                start = time.perf_counter()
                engine.step()
                elapsed = time.perf_counter() - start
                # A call that completed a step. With asynchronous scheduling it completes the step
                # launched by the call before, and its time is the pipeline's period: scheduling and
                # launching this step while waiting for that one.
                ran = engine.last_step
                if repeat and ran is not before and ran is not None and ran.sequences:
                    samples.append((step_shape(ran, bytes_per_page),
                                    elapsed if clock is None else clock.step_seconds(ran)))
            engine.kv.reset_prefix_cache()  # the next round computes its prompts again
    return samples


def fit_steps(llm: LLM, samples: list[tuple[StepShape, float]]) -> CalibratedCostModel:
    """The cost model of ``llm``'s device fitted on measured steps (:func:`measure_steps`'s)."""
    engine = llm.engine
    link = 2.5e10 if engine.device.type == "cuda" else 1e10
    return CalibratedCostModel.fit(samples, link_bytes_per_s=link, device=str(engine.device),
                                   model=str(engine.model_dir), async_scheduling=engine.async_scheduling,
                                   tensor_parallel_size=engine.tensor_parallel_size,
                                   kv_cache_dtype=kv_format(engine.config.cache.kv_cache_dtype, 1).name)


def calibrate(llm: LLM, grid: CalibrationGrid | None = None) -> CalibratedCostModel:
    return fit_steps(llm, measure_steps(llm, grid or CalibrationGrid()))
