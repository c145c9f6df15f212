#!/usr/bin/env bash
# The whole training run (stages a, b0, b, c of train/README.md) on one GPU in under 9.5 minutes
# (8.2 minutes of stage budgets, ~1 minute of start-ups, evaluations and saves): the commands of
# "The full run" with larger batches, clip-rendering worker processes and minutes instead of
# hours. Each stage stops at its --max-minutes; the learning rates follow. train/README.md, "The
# GPU run", has what one H200 run gave (there, 2048 trajectories took 51 s of the distillation's
# budget: now 512).
#
#   train/gpu_run.sh CACHE RUNS          # RUNS/{vae,latents,teacher,student}
#   SMOKE=1 train/gpu_run.sh ...         # every stage for a few steps: checks the chain
#
# DEVICE (cuda), WORKERS (12), BATCH (32, every stage's batch) can be overridden.
set -eu
CACHE=$1 RUNS=$2
DEV="--device ${DEVICE:-cuda} --workers ${WORKERS:-12} --threads 4"
B=${BATCH:-32}
if [ "${SMOKE:-0}" = 1 ]; then
    VAE="--steps 6 --eval-every 0 --eval-clips 1"
    LATENTS="--clips $((2 * B)) --heldout-clips 4"
    TEACHER="--steps 6 --eval-every 0 --eval-clips 4"
    DISTILL="--steps 4 --eval-every 0 --trajectories $B --eval-clips 4"
else
    VAE="--steps 100000 --max-minutes 3.8 --eval-every 500"
    LATENTS="--clips 8000 --max-minutes 1.0"
    TEACHER="--steps 100000 --max-minutes 2.2 --eval-every 1000"
    DISTILL="--steps 100000 --max-minutes 1.2 --trajectories 512 --eval-every 200"
fi
# 16x spatial (patch 4, two stride-2 levels), 4x temporal, 16 channels: LTX-Video's 192x
# compression; the frame-difference term from the start (train/README.md, "The GPU run")
python -m train.vae --cache "$CACHE" --out "$RUNS/vae" $DEV $VAE --batch "$B" --crops-per-clip 4 \
    --patch-size 4 --latent-channels 16 --time-weight 1 --log-every 50
python -m train.latents --cache "$CACHE" --vae "$RUNS/vae/vae" --out "$RUNS/latents" $DEV $LATENTS \
    --batch "$B"
python -m train.teacher --latents "$RUNS/latents" --out "$RUNS/teacher" $DEV $TEACHER --batch "$B" \
    --log-every 100
python -m train.distill --teacher "$RUNS/teacher" --latents "$RUNS/latents" --out "$RUNS/student" \
    $DEV $DISTILL --batch "$B" --log-every 50
