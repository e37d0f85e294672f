#!/bin/bash
# Prepares, on this machine (with PyPI access), what benchmarks/gpu.sh needs on a lent GPU machine:
#   .whl/{common,ours,heretic}   wheels the GPU image lacks (Python 3.12, x86-64)
#   .gpu_assets/<model>          the default model's config.json and tokenizer, without weights
# Both folders are git-ignored through .git/info/exclude; name them in the device call's `carry`.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.gpu_assets/\n' >> .git/info/exclude
PIP="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
$PIP -d .whl/common sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 colorlog==6.12.0
$PIP -d .whl/ours optuna==5.0.0 optuna-dashboard==0.21.0 bottle==0.13.4
# heretic 1.4 and what it imports that the image lacks (bitsandbytes and lm_eval: benchmarks/heretic_stubs)
$PIP -d .whl/heretic optuna==4.9.0 heretic-llm==1.4.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 \
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5 \
    annotated-types==0.8.0 questionary==2.1.1 prompt-toolkit==3.0.53 wcwidth==0.9.4 tomli-w==1.2.0 peft==0.21.2 \
    immutabledict==4.3.1 typing-extensions==4.16.0
MODEL=$(python3 -c "from optimizer.fetch import ensure_model_folder; print(ensure_model_folder())")
mkdir -p .gpu_assets/qwen2.5-coder-0.5b-instruct
for f in config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
    [ -f "$MODEL/$f" ] && cp "$MODEL/$f" .gpu_assets/qwen2.5-coder-0.5b-instruct/
done
du -sh .whl .gpu_assets
