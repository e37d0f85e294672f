"""The batch-size search on a tiny model: from the largest usable size down while smaller sizes
keep being faster per prompt, past sizes that run out of memory, after a warm-up of the same work."""

import io
import itertools

import pytest
import torch
from rich.console import Console

from optimizer.batching import CPU_CANDIDATES, PROBE_TOKENS, best_batch_size, measure_batch_sizes, most_prompts_probed
from optimizer.errors import UserError
from optimizer.judges import MarkerJudge
from optimizer.model import load_model
from optimizer.prompts import format_chat
from optimizer.scoring import generate_and_classify
from optimizer.workbench import prepare_scoring, resolve
from tests.test_study import short_settings

VERBS = ("pick", "fix", "build", "paint", "sell", "hide", "clean", "open")
THINGS = ("lock", "car", "boat", "house", "fence", "door", "box", "safe")
PROMPTS = [f"How do I {verb} a {thing}?" for verb in VERBS for thing in THINGS]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(str(tiny_dir), "cpu", "float32")


@pytest.fixture(scope="module")
def texts(loaded):
    assert len(PROMPTS) == max(CPU_CANDIDATES)
    return format_chat(loaded.tokenizer, PROMPTS)


def batch_shapes(loaded, run) -> list[tuple[int, ...]]:
    """The input shape of every decoder forward that `run()` makes."""
    shapes = []
    record = lambda _module, _args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape))
    hook = loaded.model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return shapes


def out_of_memory_above(loaded, rows: int):
    """Fault injection: the decoder raises CUDA's out-of-memory error for batches of more than `rows`."""

    def check(_module, _args, kwargs):
        if kwargs["input_ids"].shape[0] > rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected above {rows} rows)")

    return loaded.model.get_decoder().register_forward_pre_hook(check, with_kwargs=True)


@pytest.mark.parametrize("n", [64, 20, 4])
def test_descends_from_the_largest_size_while_smaller_ones_are_faster(loaded, texts, n):
    timings = measure_batch_sizes(loaded, texts[:n])
    usable = [c for c in CPU_CANDIDATES if c <= max(n, CPU_CANDIDATES[0])]
    measured = sorted(timings, reverse=True)
    assert measured == usable[::-1][: len(measured)]  # the largest usable first, then each next smaller one
    assert len(measured) >= min(2, len(usable))  # one smaller size is always tried
    for larger, smaller in itertools.pairwise(measured[:-1]):
        assert timings[smaller] < timings[larger]  # the descent went on past `smaller` only because it was faster
    if len(measured) >= 2 and measured[-1] != usable[0]:
        assert timings[measured[-1]] >= timings[measured[-2]]  # stopped at the first size that was not faster
    best = best_batch_size(timings)
    assert timings[best] == min(timings.values()) and best in measured[-2:]  # the rule leaves the fastest at the end
    assert all(t > 0 for t in timings.values())


def test_warm_up_does_the_first_measurements_work(loaded, texts):
    probe = lambda: generate_and_classify(loaded, texts, PROBE_TOKENS, MarkerJudge([]), 64, stop_early=False)
    one_batch = batch_shapes(loaded, probe)
    assert any(shape == (64, 1) for shape in one_batch)  # it decodes, not only prefills
    shapes = batch_shapes(loaded, lambda: measure_batch_sizes(loaded, texts))
    assert shapes[: 2 * len(one_batch)] == one_batch * 2  # warm-up, then the measurement at 64


@pytest.mark.parametrize("packed", [False, True])
def test_the_probe_prefills_as_the_trials_will(loaded, texts, packed):
    """On a CPU a study measures the batch size on its fast paths: with `packed`, the warm-up and the
    measurement make the forwards of a packed generation (prompts end to end in one row), not the
    padded batches that the plain path makes."""
    probe = lambda: generate_and_classify(loaded, texts, PROBE_TOKENS, MarkerJudge([]), 64, stop_early=False, packed=packed)
    one_batch = batch_shapes(loaded, probe)
    shapes = batch_shapes(loaded, lambda: measure_batch_sizes(loaded, texts, packed))
    assert shapes[: 2 * len(one_batch)] == one_batch * 2
    padded_prefill = [shape for shape in one_batch if shape[0] > 1 and shape[1] > 1]
    assert bool(padded_prefill) != packed


def test_the_progress_counts_every_prompt_probed(loaded, texts):
    seen: list[int] = []
    timings = measure_batch_sizes(loaded, texts, on_prompts=seen.append)
    assert sum(seen) == max(timings) + len(texts) * len(timings)  # the warm-up at the first size, then each size
    usable = [c for c in CPU_CANDIDATES if c <= len(texts)]
    assert most_prompts_probed(loaded, texts) == max(usable) + len(texts) * len(usable) >= sum(seen)
    assert most_prompts_probed(loaded, texts[:4]) == 4  # one usable size: measured once, no warm-up


def test_a_study_measures_the_batch_size_on_the_cpu_fast_paths(tiny_dir, tmp_path):
    out = io.StringIO()
    settings = short_settings(tiny_dir, scoring_prompts=16, max_new_tokens=2, batch_size=0)  # 0: measured
    scorer = prepare_scoring(resolve(settings, Console(file=out, width=200)), tmp_path)
    log = out.getvalue()
    assert scorer.paths.packed_linears > 0 and scorer.paths.packed_prefill
    assert log.index("Packed") < log.index("Prompts prefilled without padding") < log.index("Batch size")
    assert "Measuring the fastest batch size" in log  # a progress bar, with its count of prompts


def test_a_single_usable_size_is_measured_once_without_warm_up(loaded, texts):
    few = texts[:4]  # fewer prompts than the smallest candidate: only that size is usable
    probe = lambda: generate_and_classify(loaded, few, PROBE_TOKENS, MarkerJudge([]), CPU_CANDIDATES[0], stop_early=False)
    one_pass = batch_shapes(loaded, probe)
    timings = {}
    shapes = batch_shapes(loaded, lambda: timings.update(measure_batch_sizes(loaded, few)))
    assert list(timings) == [CPU_CANDIDATES[0]]
    assert shapes == one_pass  # the measurement alone: nothing to compare, so nothing to warm up for


def test_sizes_that_run_out_of_memory_pass_to_smaller_ones(loaded, texts):
    hook = out_of_memory_above(loaded, 16)
    try:
        timings = measure_batch_sizes(loaded, texts)
    finally:
        hook.remove()
    assert max(timings) == 16 and best_batch_size(timings) <= 16


def test_every_size_out_of_memory_asks_for_a_smaller_batch_size(loaded, texts):
    hook = out_of_memory_above(loaded, 4)
    try:
        with pytest.raises(UserError, match="ran out of memory.*--batch-size 4"):
            measure_batch_sizes(loaded, texts)
    finally:
        hook.remove()
