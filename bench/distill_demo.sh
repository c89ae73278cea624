#!/bin/bash
# Distillation on the demo (issue 31's acceptance; README "Distillation", docs/distillation.md):
# a teacher = the demo run (800 steps), its embeddings taught into the demo's training shards, then
# students of 200 steps (a quarter of the teacher's), with and without loss=distill, seeds 0-2.
#   bash bench/distill_demo.sh [WORKDIR]        (CPU; about an hour on a busy 2-core machine)
# Each student's held-out P@1 is the "held-out P@1 ... after X" line of WORKDIR/<plain|distill>-<seed>.log.
set -euo pipefail
WORK=${1:-runs/distill-demo}
mkdir -p "$WORK" && cd "$WORK"
export EMBEDKIT_CACHE=${EMBEDKIT_CACHE:-$PWD/cache}
EK="nice -n 10 python -m embedkit"
$EK fit recipe=demo run.dir=teacher tracking.enabled=false trainer.progress=none > teacher.log 2>&1
# only the training shards: the demo's folder also holds the held-out shard (val-000000.tar)
DEMO=$(ls -d "$EMBEDKIT_CACHE"/demo/*/ | head -1)
for f in "$DEMO"/*/train-*.tar; do sub=$(basename "$(dirname "$f")"); mkdir -p "src/$sub"; cp "$f" "src/$sub/"; done
$EK teach model=teacher shards=src out=taught batch_size=64 > teach.log 2>&1
# the distilled student keeps the demo's contrastive loss as loss.inner (the recipe's infonce settings)
INNER="loss.inner.temperature=0.02 loss.inner.learnable_temperature=true loss.inner.bidirectional=true"
for seed in 0 1 2; do
  for kind in plain distill; do
    LOSS=""; [ "$kind" = distill ] && LOSS="loss=distill $INNER"
    $EK fit recipe=demo seed=$seed trainer.max_steps=200 data.train.shards=taught run.dir=$kind-$seed \
      tracking.enabled=false trainer.progress=none $LOSS > $kind-$seed.log 2>&1
    echo "$kind-$seed: $(grep -h 'held-out P@1' $kind-$seed.log)"
  done
done
