"""Where the refusal directions are read: other prompt positions than the last, and the last layer
after the model's final norm, at fixed kernels and a sweep of weights.

Our residuals (and heretic's) are taken at each direction prompt's last position, the one that
predicts the first answer token. Arditi et al. (2024) take them at every post-instruction position of
the chat template (for ChatML: `<|im_end|>`, `\\n`, `<|im_start|>`, `assistant`, `\\n`) and pick the
best (position, layer) pair. Heretic reads them from transformers' `output_hidden_states`, whose last
entry is the last block's output after the final norm (what the LM head reads), where ours took the
raw block output. The question: which of these gives per-layer mean differences that remove more
refusals per unit of KL? Variants (`--variants`):

- `raw`: every block's own output at the last position (our directions before `--normed-last-direction`);
  `study`: the study's cached statistics (with the defaults of the code that runs), a check;
- `last`: `raw`, but the last layer's after the final norm (heretic's; `--normed-last-direction`);
- `rms-last`, `gamma-last`: the last layer's with only the norm's RMS scaling, or only its weight;
- `normed-all`: the final norm applied to every layer's residual;
- `tail-mean`: the mean over the last five positions; `pos-K`: the K-th position from the end.

Everything else is fixed: the prompts that pass the --refused-directions filter (judged as a study
judges them), the kernel (the same for attention and MLP), the edit (ours, exact projection);
residuals come from a plain transformers forward with `output_hidden_states` (hidden_states[l + 1]
is block l's output) and a hook on the final norm's input, checked against the study's cache.

    python benchmarks/position_sweep.py [--model DIR] [--prompts 64] [--weights W ...] [--variants V ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer.config import Settings
from optimizer.params import Kernel, TrialParams, build_plan
from optimizer.prompts import format_chat, load_prompts, split_prompts
from optimizer.scoring import first_token_logprobs, generate_and_classify, kl_divergence
from optimizer.workbench import load_judge, prepare, resolve

KERNELS = {"p.6 f.45": (0.6, 0.45), "p.75 f.25": (0.75, 0.25)}  # peak, falloff (x last layer)
TAIL = 5  # ChatML's post-instruction tokens


@torch.inference_mode()
def tail_states(loaded, texts: list[str], batch: int = 16) -> torch.Tensor:
    """(L + 1, n, TAIL, d): every block's output at each prompt's last TAIL positions (left padding),
    then the last block's output after the model's final norm."""
    tok = loaded.tokenizer
    tok.padding_side = "left"
    out, raw = [], []
    final_norm = loaded.model.model.norm
    hook = final_norm.register_forward_hook(lambda m, args, output: raw.append(args[0][:, -TAIL:].float()))
    try:
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            hs = loaded.model(**enc, output_hidden_states=True).hidden_states[1:]
            # transformers' last hidden state is after the final norm (as heretic's directions are); keep both
            out.append(torch.stack([*(h[:, -TAIL:].float() for h in hs[:-1]), raw[-1], hs[-1][:, -TAIL:].float()]))
    finally:
        hook.remove()
    return torch.cat(out, dim=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=str(Path.home() / ".cache/optimizer/models/smollm2-135m-refusing"))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--cap", type=int, default=12)
    p.add_argument("--weights", type=float, nargs="+", default=[0.35, 0.5, 0.7, 0.9, 1.2, 1.5])
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--variants", nargs="+", default=["raw", "last", "tail-mean", "pos-2", "pos-3", "pos-5"])
    a = p.parse_args()
    console = Console(stderr=True)
    s = Settings(
        model=a.model,
        study="ps",
        studies_dir="/tmp/position-sweep",
        direction_prompts=64,
        scoring_prompts=8,
        max_new_tokens=a.cap,
        device="cpu",
        dtype="float32",
        batch_size=32,
    )
    spec = resolve(s, console)
    bench = prepare(spec, s.cache_path())
    L, bs = bench.loaded, bench.batch_size
    judge = load_judge(s, L)
    # the --refused-directions filter, as the study applies it
    t = spec.texts
    refused_b = torch.tensor(generate_and_classify(L, t.direction_harmful, a.cap, judge, bs, t.direction_prompts[0]).refused)
    refused_g = torch.tensor(generate_and_classify(L, t.direction_harmless, a.cap, judge, bs, t.direction_prompts[1]).refused)
    hb = tail_states(L, t.direction_harmful)[:, refused_b]
    hg = tail_states(L, t.direction_harmless)[:, ~refused_g]
    tail = L.tokenizer(t.direction_harmful[0], add_special_tokens=False)["input_ids"][-TAIL:]
    print(
        f"# {Path(a.model).name}: directions from {hb.shape[1]} refused harmful, {hg.shape[1]} answered harmless prompts;"
        f" tail tokens {L.tokenizer.convert_ids_to_tokens(tail)}"
    )
    final_norm = L.model.model.norm
    md = lambda b, g: b.mean(1) - g.mean(1)
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))
    with torch.no_grad():
        normed_b, normed_g = final_norm(hb[:-1, :, -1]).float(), final_norm(hg[:-1, :, -1]).float()
    raw = md(hb[:-1, :, -1], hg[:-1, :, -1])
    at_last = lambda v: torch.cat([raw[:-1], v[None]])
    diffs = {
        "study": bench.stats.mean_diff.float(),
        "raw": raw,
        "last": at_last(md(hb[-1:, :, -1], hg[-1:, :, -1])[0]),  # heretic's: the final norm at the last layer
        "rms-last": at_last(md(rms(hb[-2:-1, :, -1]), rms(hg[-2:-1, :, -1]))[0]),  # the norm without its weight
        "gamma-last": at_last(final_norm.weight.float() * raw[-1]),  # the norm's weight only
        "normed-all": md(normed_b, normed_g),  # the final norm applied at every layer
        "tail-mean": md(hb[:-1].mean(2), hg[:-1].mean(2)),
    }
    for k in range(2, TAIL + 1):
        diffs[f"pos-{k}"] = md(hb[:-1, :, -k], hg[:-1, :, -k])
    cos = torch.nn.functional.cosine_similarity(diffs["raw"], bench.stats.mean_diff.float(), dim=-1)
    print(f"# check: cosine of the last position's mean difference with the study's, per layer: {cos.tolist()}")
    unit = {k: torch.nn.functional.normalize(v, dim=-1) for k, v in diffs.items()}
    for k in a.variants:
        c = (unit[k] * unit["raw"]).sum(-1)
        print(f"# cosine {k} vs raw, layers 0/mid/last: {c[0]:.2f}/{c[len(c) // 2]:.2f}/{c[-1]:.2f}")

    heldout = {k: split_prompts(load_prompts(None, k)).heldout[: a.prompts] for k in ("harmful", "harmless")}
    texts = {k: format_chat(L.tokenizer, prompts) for k, prompts in heldout.items()}
    base_lp = first_token_logprobs(L, texts["harmless"], bs)
    base = generate_and_classify(L, texts["harmful"], a.cap, judge, bs, heldout["harmful"]).count
    print(f"# held-out: {a.prompts} prompts per set, cap {a.cap}; unedited {base}/{a.prompts}")
    print("| kernel | w | directions | refusals | KL |")
    print("|---|---|---|---|---|")
    last = L.n_layers - 1
    for kname in a.kernels:
        pk, fo = KERNELS[kname]
        for w in a.weights:
            kern = Kernel(peak_weight=w, peak_layer=pk * last, min_ratio=0.3, falloff=fo * last)
            params = TrialParams("mean_diff", None, None, {"attn": kern, "mlp": kern})
            for variant in a.variants:
                stats = dataclasses.replace(bench.stats, mean_diff=diffs[variant].to(bench.stats.mean_diff))
                plan, _ = build_plan(params, stats)
                bench.hooks.apply(plan)
                kl = kl_divergence(base_lp, first_token_logprobs(L, texts["harmless"], bs))
                ref = generate_and_classify(L, texts["harmful"], a.cap, judge, bs, heldout["harmful"]).count
                bench.hooks.clear()
                print(f"| {kname} | {w} | {variant} | {ref}/{a.prompts} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
