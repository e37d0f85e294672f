"""Seed 1 was cut off at heretic's trial 85 of 100: both curves from the raw logs beside this file.

    python benchmarks/gpu_logs/ttf-real-default-seed1/partial_hv.py
"""
import json, re, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from time_to_front import hv_curve, time_to_reach
d = str(Path(__file__).resolve().parent) + "/"
ours = []
for line in open(d + "ours.log"):
    m = re.match(r"\[\s*([\d.]+)\] \[\d+/101\] trial (\d+): refusals (>=)?(\d+)/64, KL ([\d.]+)", line)
    if m and int(m.group(2)) > 0:
        ours.append({"finish_s": float(m.group(1)), "point": [int(m.group(4)) / 64, float(m.group(5))]})
ends = [json.loads(l)["t"] for l in open(d + "timings.jsonl") if '"trial_end"' in l]
log = open(d + "ttf_real_heretic.log").read()
kls = [float(x) for x in re.findall(r"KL divergence: ([\d.]+)", log)]
refs = [int(x) for x in re.findall(r"Refusals: (\d+)/64", log)]
print(len(ends), len(kls), len(refs))
n = min(len(ends), len(kls), len(refs))
# trial i's KL and count are the i-th of each ("Initial refusals", heretic's baseline, does not match);
# the cut-off trial 85 printed its KL but no count, so n stops at 84
her = [{"finish_s": ends[i], "point": [refs[i] / 64, kls[i]]} for i in range(n)]
ref = (44 / 64, 1.0)
co, ch = hv_curve(ours, ref), hv_curve(her, ref)
print("ours final", co[-1], "n", len(ours)); print("heretic partial", ch[-1], "n", len(her))
t = ch[-1][1]
print("ours to heretic's partial HV", time_to_reach(co, t), "heretic", time_to_reach(ch, t))
for s in (30, 40, 60, 100, 150, 190):
    f = lambda c: max([hv for x, hv in c if x <= s] or [0])
    print(s, round(f(co), 4), round(f(ch), 4))
