#!/usr/bin/env bash
# B3 batches against random (task-homogeneous) batches on the demo data at a small batch (16), held-out
# P@1 over 3 seeds each (issue 31's acceptance; README "B3 batch mining"). The teacher is a finished demo
# run on the same 2,000 drawn examples (the demo recipe, 200 steps at batch 64). Usage, from the repository root:
#   nice -n 10 bash bench/b3_demo.sh [OUT_DIR]        (default bench/out/b3; STEPS=250 student steps)
#   INIT=1 nice -n 10 bash bench/b3_demo.sh OUT_DIR   both arms start from the teacher's weights (init_from:
#                                                     a second stage, as B3 starts from VLM2Vec); TEACHER=DIR
#                                                     reuses a finished teacher run; EXTRA="train.lr=3e-4"
#                                                     adds overrides to both arms
# Prints one line per run and writes OUT_DIR/results.tsv (arm, seed, held-out P@1 after).
set -euo pipefail
OUT=${1:-bench/out/b3}
mkdir -p "$OUT"
PY=${PYTHON:-python}
TEACHER=${TEACHER:-$OUT/teacher}
STEPS=${STEPS:-250}
DATA=(recipe=demo data.demo.train_size=2000 tracking.enabled=false)
COMMON=("${DATA[@]}" train.global_batch_size=16 train.chunk_size=16 data.train.task_batch_size=16
        trainer.max_steps=$STEPS trainer.val_check_interval=$STEPS ${EXTRA:-})
if [ ! -f "$TEACHER/checkpoints/last.ckpt" ]; then
  $PY -m embedkit fit "${DATA[@]}" trainer.max_steps=200 trainer.val_check_interval=200 run.dir="$TEACHER" \
    > "$OUT/teacher.log" 2>&1
fi
grep "held-out" "$OUT/teacher.log" || true
: > "$OUT/results.tsv"
for seed in 0 1 2; do
  for arm in random b3; do
    extra=()
    if [ "${INIT:-0}" = 1 ]; then
      extra=(init_from="$TEACHER")
    fi
    if [ "$arm" = b3 ]; then
      extra+=(data.train.batching=b3 data.train.b3.teacher="$TEACHER" data.train.b3.cluster_size=16)
    fi
    log="$OUT/$arm-$seed.log"
    $PY -m embedkit fit "${COMMON[@]}" seed=$seed run.dir="$OUT/$arm-$seed" "${extra[@]}" > "$log" 2>&1
    p1=$(sed -n 's/.*-> after \([0-9.]*\).*/\1/p' "$log")
    printf '%s\t%s\t%s\n' "$arm" "$seed" "$p1" | tee -a "$OUT/results.tsv"
  done
done
