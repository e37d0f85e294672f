#!/bin/bash
# The GPU rows of benchmarks/RESULTS.md, on a lent GPU machine (no network, 64 MiB of files per call).
#
#   bash benchmarks/gpu.sh STEP...      STEP: graph | speed | 32b | moe | pca | early | filter | ttf | ttf-real
#
# Expects, beside the repository (git-ignored, carried with the call; made by benchmarks/gpu_assets.sh):
#   .whl/common, .whl/ours, .whl/heretic  wheels missing on the machine (optuna 5 for us, optuna 4.9 + heretic 1.4 for heretic)
#   .gpu_assets/qwen2.5-coder-0.5b-instruct  config.json and tokenizer files of the default model (no weights)
#   .part1 .part2 .part3  (ttf-real) the synthetic refusing SmolLM2-135M in int8 parts, made by
#                         `python benchmarks/pack_model.py pack MODEL_DIR .part`, one call each: the working
#                         copy there is replaced on every call, so each call keeps what it carried in /tmp
#                         (call 1, carry .part1 .whl: `mkdir -p /tmp/parts && cp -r .part1 /tmp/parts/ &&
#                         cp -r .whl /tmp/whl`; call 2, carry .part2: `cp -r .part2 /tmp/parts/`; call 3,
#                         carry .part3: `cp -r /tmp/whl .whl && bash benchmarks/gpu.sh ttf-real`), all on
#                         one warm machine (it goes back 30 s after a call)
#   PARTS=.dpart          (ttf-real) another checkpoint's parts instead (default .part): the default model,
#                         Qwen2.5-Coder-0.5B-Instruct, is 12 parts by `pack_model.py pack MODEL_DIR .dpart
#                         --first-mib 30` (.dpart1 with .whl fits one call); calls 2-11 as call 2 above
#                         (`cp -r .dpartN /tmp/parts-.dpart/`), call 12 runs the step
# Logs and summaries go to $OUT (the device tool brings that folder back).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Once per machine (rm -rf the folder to install again): the wheels, then their bytecode, compiled on
# every core, as pip's own install compiles it for a user (one file at a time: slower here). Without
# it every process's imports compile what they read, and a reinstall on each call threw that away
# for ours and not for heretic (installed once): the start-up of a run would count it.
install() {
    [ -f "$1/.installed" ] && return
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}" || exit 1
    python3 -m compileall -q -j 0 "$1" > /dev/null 2>&1  # a file of the wheels' that does not compile stays source
    touch "$1/.installed"
}
install /tmp/site-ours .whl/common/*.whl .whl/ours/*.whl
install /tmp/site-heretic .whl/common/*.whl .whl/heretic/*.whl
python3 -m compileall -q optimizer benchmarks > /dev/null  # this call's copy of the working tree has no bytecode yet
# heretic's own interpreter: its optuna 4.9, and stand-ins for two imports it does not use here
cat > /tmp/heretic-python <<EOF
#!/bin/sh
PYTHONPATH=/tmp/site-heretic:$PWD/benchmarks/heretic_stubs exec python3 "\$@"
EOF
chmod +x /tmp/heretic-python
export PYTHONPATH=/tmp/site-ours

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, optuna; print('torch', torch.__version__, 'transformers', transformers.__version__, 'optuna', optuna.__version__)" | tee -a "$OUT/machine.txt"
/tmp/heretic-python -c "import heretic.main, optuna; print('heretic imports; optuna', optuna.__version__)" | tee -a "$OUT/machine.txt"

ASSETS=.gpu_assets/qwen2.5-coder-0.5b-instruct
for step in "$@"; do
    start=$(date +%s)
    case $step in
        speed)  # default prompt counts, each tool picks its batch size by measurement
            rm -rf /tmp/speed
            timeout ${SPEED_S:-300} python3 benchmarks/trial_speed.py --device cuda --random-weights --model $ASSETS --trials 8 \
                --prompts 64 --direction-prompts 128 --batch-size 0 --workdir /tmp/speed --heretic-python /tmp/heretic-python 2>&1 | tee "$OUT/speed.log"
            cp /tmp/speed/summary.json "$OUT/speed_summary.json" 2>/dev/null
            tail -c 200000 /tmp/speed/heretic/heretic.log > "$OUT/speed_heretic.log" 2>/dev/null ;;
        graph)  # one trial's refusal generation: eager decoding vs the captured decode step
            timeout ${GRAPH_S:-150} python3 benchmarks/decode_graph.py --random-weights --model $ASSETS 2>&1 | tee "$OUT/graph.log" ;;
        32b)
            timeout ${SHAPE_S:-240} python3 benchmarks/trial_32b.py --tokenizer $ASSETS --trials 3 2>&1 | tee "$OUT/32b.log" ;;
        moe)  # Qwen3-30B-A3B's shape: 128 fused experts a layer, random bf16 weights
            timeout ${MOE_S:-200} python3 benchmarks/trial_32b.py --config benchmarks/configs/qwen3-30b-a3b.json \
                --tokenizer $ASSETS --trials 3 ${MOE_ARGS:-} 2>&1 | tee "$OUT/moe.log" ;;
        early)  # early stop with the captured decode step (CUDA-only test) and the front with/without the stop on CUDA
            mkdir -p /tmp/optimizer-home/models && cp -r $ASSETS /tmp/optimizer-home/models/
            OPTIMIZER_HOME=/tmp/optimizer-home timeout ${EARLY_S:-150} python3 -m pytest -q -p no:cacheprovider \
                tests/test_graph_decode.py tests/test_early_stop.py 2>&1 | tee "$OUT/early.log" ;;
        filter)  # the one-time cost of the direction residuals and --refused-directions on CUDA, old way and new
            timeout ${FILTER_S:-200} python3 benchmarks/direction_cost.py --device cuda --random-weights --model $ASSETS \
                --init-range 0.3 --markers q,z,x --direction-prompts 128 --batch-size ${FILTER_BATCH:-64} 2>&1 | tee "$OUT/filter.log" ;;
        ttf)  # time to a good front at the default prompt counts; random weights with the synthetic yardstick
            rm -rf /tmp/ttf
            timeout ${TTF_S:-330} python3 benchmarks/time_to_front.py --device cuda --random-weights --model $ASSETS \
                --init-range 0.3 --markers q,z,x --trials ${TTF_TRIALS:-100} --seed ${TTF_SEED:-0} --scoring-prompts 64 --direction-prompts 128 \
                --batch-size 0 --workdir /tmp/ttf --plot "$OUT/time_to_front_gpu.png" --heretic-python /tmp/heretic-python \
                2>&1 | tee "$OUT/ttf.log"
            cp /tmp/ttf/time_to_front.json "$OUT/ttf.json" 2>/dev/null ;;
        ttf-real)  # time to a good front on a real refusing checkpoint (carried in parts), default prompt counts
            P=${PARTS:-.part}; DIR=/tmp/parts; [ "$P" = .part ] || DIR=/tmp/parts-$P
            mkdir -p $DIR && cp -r $P[0-9]* $DIR/ 2>/dev/null  # the part this call carried
            python3 benchmarks/pack_model.py unpack /tmp/model$P $DIR/$P[0-9]* || exit 1
            rm -rf /tmp/ttf-real
            timeout ${TTF_S:-330} python3 benchmarks/time_to_front.py --device cuda --model /tmp/model$P \
                --trials ${TTF_TRIALS:-100} --seed ${TTF_SEED:-0} --scoring-prompts 64 --direction-prompts 128 \
                --batch-size 0 --workdir /tmp/ttf-real --plot "$OUT/ttf_real_seed${TTF_SEED:-0}.png" \
                --heretic-python /tmp/heretic-python 2>&1 | tee "$OUT/ttf_real_seed${TTF_SEED:-0}.log"
            cp /tmp/ttf-real/time_to_front.json "$OUT/ttf_real_seed${TTF_SEED:-0}.json" 2>/dev/null
            # what a run cut off by its timeout leaves: our log and study, heretic's trial events and log's end
            cp /tmp/ttf-real/ours.log /tmp/ttf-real/studies/ttf-ours.db /tmp/ttf-real/heretic/timings.jsonl "$OUT/" 2>/dev/null
            tail -c 200000 /tmp/ttf-real/heretic/heretic.log > "$OUT/ttf_real_heretic.log" 2>/dev/null ;;
        pca)
            timeout ${PCA_S:-120} python3 benchmarks/pca.py --device cuda 2>&1 | tee "$OUT/pca.log" ;;
        *) echo "unknown step $step" ;;
    esac
    echo "step $step took $(( $(date +%s) - start )) s" | tee -a "$OUT/machine.txt"
done
