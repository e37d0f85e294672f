"""What each trial-speed change buys, one at a time, on one model and one set of prompts.

    python benchmarks/trial_parts.py [--model DIR] [--prompts 32] [--cap 64]

Each row times the same work with the change and without it (median of repeats after a warm-up).
Also measures where refusal markers first appear in the unedited model's answers, which is what
justifies the response-length cap.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer.ablation import AblationHooks, bake_into_weights
from optimizer.batching import measure_batch_sizes
from optimizer.components import COMPONENTS
from optimizer.config import DEFAULT_REFUSAL_MARKERS
from optimizer.cpu_linear import pack_linear_layers, unpack_linear_layers
from optimizer.directions import compute_stats
from optimizer.judges import MarkerJudge, normalise
from optimizer.model import load_model
from optimizer.params import Kernel, TrialParams, build_plan
from optimizer.prompts import format_chat, load_prompts, split_prompts
from optimizer.residuals import collect_residuals, layer_residuals, tokenize
from optimizer.scoring import eager_step, first_token_logprobs, generate_and_classify, prefill, split_shared_prefix


def timed(fn, repeats: int = 2) -> tuple[float, object]:
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


@torch.inference_mode()
def kl_full_logits(loaded, texts, batch_size):
    """The plain way: full-vocabulary logits at every position, then the last one."""
    out = []
    for i in range(0, len(texts), batch_size):
        out.append(
            loaded.model(**tokenize(loaded, texts[i : i + batch_size]), use_cache=False).logits[:, -1].float().log_softmax(-1)
        )
    return torch.cat(out)


@torch.inference_mode()
def kl_last_position(loaded, texts, batch_size):
    """Last position only, but every prompt's full text forwarded (no shared prefix)."""
    out = []
    for i in range(0, len(texts), batch_size):
        logits = loaded.model(**tokenize(loaded, texts[i : i + batch_size]), use_cache=False, logits_to_keep=1).logits
        out.append(logits[:, -1].float().log_softmax(-1))
    return torch.cat(out)


def marker_positions(loaded, texts, cap, markers) -> list[int | None]:
    """For each answer (greedy, `cap` tokens, no early stop): the number of tokens after which a
    marker is first visible, or None when no marker appears."""
    result = generate_and_classify(loaded, texts, cap, MarkerJudge([]), len(texts), stop_early=False)
    positions = []
    for text in result.responses:
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        found = None
        for k in range(1, len(ids) + 1):
            if any(m in normalise(loaded.tokenizer.decode(ids[:k])) for m in markers):
                found = k
                break
        positions.append(found)
    return positions


@torch.inference_mode()
def cpu_changes(loaded, harmful, harmless, bs) -> list[tuple[str, float, str]]:
    """The two CPU changes, one after the other: linear weights packed for oneDNN, then the
    prefill without padding (on a model whose modules are plain and whose prefill is padded)."""
    prefix, suffixes = split_shared_prefix(loaded, harmful)
    logits, cache, mask = prefill(loaded, prefix, suffixes)
    step = lambda: eager_step(loaded, logits.argmax(-1), mask, copy.deepcopy(cache))
    kl = lambda: first_token_logprobs(loaded, harmless, bs)
    refusal_prefill = lambda: prefill(loaded, prefix, suffixes)
    plain = [timed(step, 3), timed(kl), timed(refusal_prefill)]
    pack_linear_layers(loaded, Console(file=io.StringIO()))
    packed = [timed(step, 3), timed(kl), timed(refusal_prefill)]
    kl_unpadded = lambda: first_token_logprobs(loaded, harmless, bs, packed=True)
    refusal_prefill_unpadded = lambda: prefill(loaded, prefix, suffixes, packed=True)
    unpadded = [None, timed(kl_unpadded), timed(refusal_prefill_unpadded)]
    unpack_linear_layers(loaded.model)

    real, padded = sum(map(len, suffixes)), len(suffixes) * max(map(len, suffixes))
    dlogp = lambda result: f"max |dlogp| {(result[1] - plain[1][1]).abs().max():.1e}"
    return [
        (f"decode step at batch {len(suffixes)}: plain F.linear", plain[0][0], "baseline"),
        ("decode step: linear weights packed for oneDNN once per study", packed[0][0], f"{plain[0][0] / packed[0][0]:.2f}x"),
        ("KL pass: plain F.linear", plain[1][0], "baseline"),
        ("KL pass: packed linear weights", packed[1][0], f"{plain[1][0] / packed[1][0]:.2f}x ({dlogp(packed[1])})"),
        (
            "KL pass: + prompts end to end without padding",
            unpadded[1][0],
            f"{packed[1][0] / unpadded[1][0]:.2f}x ({dlogp(unpadded[1])})",
        ),
        (f"refusal prefill ({padded} prompt tokens padded, {real} real): plain F.linear", plain[2][0], "baseline"),
        ("refusal prefill: packed linear weights", packed[2][0], f"{plain[2][0] / packed[2][0]:.2f}x"),
        ("refusal prefill: + without padding", unpadded[2][0], f"{packed[2][0] / unpadded[2][0]:.2f}x"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--cap", type=int, default=64, help="answer length for the marker-position measurement")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if args.model is None:
        from optimizer.fetch import ensure_model_folder

        args.model = ensure_model_folder()
    torch.set_num_threads(torch.get_num_threads())
    loaded = load_model(str(args.model), "cpu", "float32")
    harmful = format_chat(loaded.tokenizer, split_prompts(load_prompts(None, "harmful")).scoring[: args.prompts])
    harmless = format_chat(loaded.tokenizer, split_prompts(load_prompts(None, "harmless")).scoring[: args.prompts])
    markers = [normalise(m) for m in DEFAULT_REFUSAL_MARKERS]
    bs, cap = args.batch_size, args.max_new_tokens
    rows = []

    full_s, full = timed(lambda: kl_full_logits(loaded, harmless, bs))
    last_s, last = timed(lambda: kl_last_position(loaded, harmless, bs))
    ours_s, ours = timed(lambda: first_token_logprobs(loaded, harmless, bs))
    diff = max((full - ours).abs().max().item(), (last - ours).abs().max().item())
    rows.append(("KL pass: full logits, every position", full_s, "baseline"))
    rows.append(("KL pass: last position only", last_s, f"{full_s / last_s:.2f}x"))
    rows.append(
        ("KL pass: + shared prefix once, LM head as one matmul", ours_s, f"{full_s / ours_s:.2f}x (max |dlogp| {diff:.1e})")
    )

    # a mid-strength edit, so that some answers refuse and some do not
    direction_dirs = format_chat(loaded.tokenizer, split_prompts(load_prompts(None, "harmful")).direction[:32])
    direction_good = format_chat(loaded.tokenizer, split_prompts(load_prompts(None, "harmless")).direction[:32])
    stats = compute_stats(
        *(layer_residuals(collect_residuals(loaded, texts, bs), False) for texts in (direction_dirs, direction_good))
    )
    n = loaded.n_layers
    kernel = Kernel(peak_weight=1.0, peak_layer=0.6 * n, min_ratio=0.5, falloff=0.4 * n)
    params = TrialParams("mean_diff", None, None, {c: kernel for c in COMPONENTS})
    plan_s, (plan, _) = timed(lambda: build_plan(params, stats), repeats=5)
    params_c = TrialParams("contrastive", 1.0, None, {c: kernel for c in COMPONENTS})
    plan_c_s, _ = timed(lambda: build_plan(params_c, stats), repeats=5)
    rows.append(("directions for a trial (per-layer, mean-diff)", plan_s, "-"))
    rows.append(("directions for a trial (per-layer, cPCA alpha=1)", plan_c_s, "-"))

    hooks = AblationHooks(loaded)
    for label, apply in (("unedited", False), ("edited", True)):
        if apply:
            hooks.apply(plan)
        no_stop_s, no_stop = timed(
            lambda: generate_and_classify(loaded, harmful, cap, MarkerJudge(markers, echo_aware=False), bs, stop_early=False), 1
        )
        stop_s, stop = timed(lambda: generate_and_classify(loaded, harmful, cap, MarkerJudge(markers, echo_aware=False), bs), 1)
        assert stop.refused == no_stop.refused
        rows.append(
            (
                f"refusals ({label}, {stop.count}/{len(harmful)} refuse): generate to the cap",
                no_stop_s,
                f"{no_stop.tokens_generated} tokens",
            )
        )
        rows.append(
            (f"refusals ({label}): drop decided sequences", stop_s, f"{no_stop_s / stop_s:.2f}x, {stop.tokens_generated} tokens")
        )
    hooks.clear()

    targets = [site.module for site in loaded.discovery.present()]

    def copy_edit_restore():
        saved = [m.weight.detach().clone() for m in targets]
        bake_into_weights(loaded, plan)
        with torch.no_grad():
            for m, w in zip(targets, saved):
                m.weight.copy_(w)

    copy_s, _ = timed(copy_edit_restore, 3)
    hook_s, _ = timed(lambda: (hooks.apply(plan), hooks.clear()), 5)
    rows.append(("edit by weight copy + bake + restore", copy_s, "baseline"))
    rows.append(("edit by hooks (set tensors, clear)", hook_s, f"{copy_s / max(hook_s, 1e-9):.0f}x"))
    baked = copy.deepcopy(loaded)
    bake_into_weights(baked, plan)
    hooks.apply(plan)
    hooked_kl_s, _ = timed(lambda: first_token_logprobs(loaded, harmless, bs))
    hooks.clear()
    baked_kl_s, _ = timed(lambda: first_token_logprobs(baked, harmless, bs))
    rows.append(
        ("KL pass with hooks active", hooked_kl_s, f"{hooked_kl_s / baked_kl_s:.3f}x of baked weights ({baked_kl_s:.2f} s)")
    )

    batch = measure_batch_sizes(loaded, harmful)
    for size, t in sorted(batch.items()):
        rows.append((f"batch size {size}: short generation", t * len(harmful[: max(batch)]), f"{1000 * t:.0f} ms per prompt"))

    rows.extend(cpu_changes(loaded, harmful, harmless, bs))  # last: everything above ran on plain modules, padded

    positions = marker_positions(loaded, harmful, args.cap, markers)
    found = sorted(p for p in positions if p is not None)
    print(
        f"# {args.model.name}, cpu float32, {torch.get_num_threads()} threads, {args.prompts} prompts per set, "
        f"cap {cap}, batch {bs}"
    )
    print("| what | seconds | effect |")
    print("|---|---|---|")
    for what, seconds, effect in rows:
        print(f"| {what} | {seconds:.3f} | {effect} |")
    print(
        f"# refusal markers in {len(found)}/{len(positions)} unedited answers of {args.cap} tokens; first visible after "
        f"tokens: min {found[0] if found else '-'}, median {statistics.median(found) if found else '-'}, "
        f"max {found[-1] if found else '-'}; "
        + ", ".join(f"<= {k}: {sum(p <= k for p in found)}" for k in (4, 8, 12, 16, 24, 32, 48))
    )


if __name__ == "__main__":
    main()
