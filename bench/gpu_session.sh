#!/usr/bin/env bash
# The host-overhead GPU measurements (docs/gradcache.md) in one call of the `device` tool (15 minutes of device time in all,
# at most 10 a command): the demo's steps/s, the ~300M Qwen2-VL-shaped step, the realistic
# GradCache bench. Each part has its own time limit, so a slow one cannot eat the others; a
# table of what each printed comes last.
#
#   make device-wheels                    # here, once: omegaconf and webdataset as py3.12 wheels in .whl/
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=590)
#   bash bench/gpu_session.sh --cpu       # the rehearsal on this machine: tiny sizes, same steps
#
# The device's image has torch, lightning, transformers and peft but not omegaconf or webdataset:
# they travel as wheels and go to /tmp/site. mlflow is not needed (tracking stays off).
# Logs go to $OUT (the device tool returns that folder), or to bench/out/ when $OUT is unset.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
MODE=${1:-}

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ "$MODE" = --cpu ]; then
    [ -x .venv/bin/python ] && PY=.venv/bin/python
    # the device has no mlflow: the rehearsal proves the path never imports it
    mkdir -p /tmp/no-mlflow/mlflow
    echo 'raise ImportError("mlflow is not installed on the device machine")' >/tmp/no-mlflow/mlflow/__init__.py
    export PYTHONPATH="/tmp/no-mlflow:$PYTHONPATH"
fi

# name, time limit (s), command
if [ "$MODE" = --cpu ]; then
    PARTS=(
        "demo_profile|120|$PY bench/profile_step.py --preset tiny --device cpu --steps 5 --threads 1"
        "demo_fit|300|$PY -m embedkit fit tracking.enabled=false trainer.max_steps=20 data.demo.train_size=256 data.demo.val_size=16 run.dir=$OUT/demo_run"
        "gradcache|240|$PY bench/gradcache.py --cpu --sizes 16 64 --chunk 16 --steps 1"
    )
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    PARTS=(
        "demo_profile|90|$PY bench/profile_step.py --preset demo --device cuda --steps 100"
        "demo_fit|200|$PY -m embedkit fit tracking.enabled=false run.dir=$OUT/demo_run"
        "qwen300m|150|$PY bench/profile_step.py --preset qwen300m --device cuda --steps 5"
        "gradcache|110|$PY bench/gradcache.py --chunk 64 --sizes 64 256"
    )
fi

summary=()
for part in "${PARTS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$part"
    echo "=== $name ($limit s): $cmd"
    start=$(date +%s)
    timeout -k 10 "$limit" bash -c "$cmd" >"$OUT/$name.log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    tail -n 25 "$OUT/$name.log"
    # the lines a reader wants from each part: steps/s, step time, ratios, P@1
    key=$(grep -E "steps/s|step time|s/step|x[0-9.]+|ratio|P@1|idle" "$OUT/$name.log" | tail -n 4 | tr '\n' ' ')
    summary+=("$name rc=$rc ${took}s: ${key:-(no figure; see $OUT/$name.log)}")
done

echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
