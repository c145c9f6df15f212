#!/usr/bin/env bash
# Continue the shipped demo model on one GPU in under 9.5 minutes: only the repository (with its
# weights/) and the packed photo cache travel to the machine, so each stage starts from what
# weights/ holds instead of from scratch (train/README.md, "Continuing on a GPU"):
#   latents  of new clips, encoded by the shipped VAE (its encoder, so the latent space, is kept)
#   teacher  --init-from the shipped teacher, at a larger batch
#   student  distilled afresh from the continued teacher
#   vae      with DECODER=1 only: the shipped VAE's decoder fine-tuned (--decoder-from) alongside
#            the teacher (which needs no clip rendering, so the CPU workers are free for it)
#
#   train/gpu_continue.sh CACHE RUNS          # from the repository root; RUNS/{latents,teacher,
#                                             # student,vae}
#   SMOKE=1 train/gpu_continue.sh ...         # every stage for a few steps: checks the chain
#   PROBE=1 train/gpu_continue.sh ...         # also 30 eager teacher steps, to time --compile
#
# DEVICE (cuda), WORKERS (14 for the latents, 2 fewer for the decoder) can be overridden.
# The fourth release's run had the decoder on, and teacher 4.8 / distillation 1.4 minutes with
# 1,024 trajectories: the decoder cost the teacher ~1.4x per sample and the trajectories took 42 s
# of the distillation's budget (its --max-minutes counts them), leaving it 86 steps. The decoder
# now stays off unless asked for. The fifth release's run (PROBE=1, these budgets): 568.7 s wall,
# teacher 964 steps (0.25 s each compiled, 0.33 eager), 512 trajectories in 14 s, 280 student
# steps.
set -eu
CACHE=$1 RUNS=$2
DEV="--device ${DEVICE:-cuda} --threads 4"
W=${WORKERS:-14}
SHIPPED=weights/tinyi2v-teacher/transformer            # the teacher every run starts from
if [ "${SMOKE:-0}" = 1 ]; then
    LATENTS="--clips 16 --heldout-clips 4 --batch 4"
    TEACHER="--steps 4 --eval-every 0 --eval-clips 4 --batch 4 --compile"
    DISTILL="--steps 4 --eval-every 0 --trajectories 4 --eval-clips 4 --batch 4"
    VAE="--steps 4 --eval-every 0 --eval-clips 1 --batch 4"
else
    LATENTS="--clips 20000 --max-minutes 1.2 --batch 32"
    TEACHER="--steps 100000 --max-minutes 4.7 --eval-every 1000 --batch 128 --lr 4e-4 --compile"
    DISTILL="--steps 100000 --max-minutes 1.6 --trajectories 512 --eval-every 200 --batch 32"
    VAE="--steps 100000 --max-minutes 6.6 --eval-every 500 --batch 32"
fi
python -m train.latents --cache "$CACHE" --vae weights/tinyi2v-demo/vae --out "$RUNS/latents" \
    $DEV --workers "$W" $LATENTS
if [ "${DECODER:-0}" = 1 ]; then
    python -m train.vae --cache "$CACHE" --decoder-from weights/tinyi2v-demo/vae \
        --out "$RUNS/vae" $DEV --workers $((W - 2)) $VAE --crops-per-clip 4 --time-weight 1 \
        --log-every 50 &
fi
if [ "${PROBE:-0}" = 1 ]; then       # the teacher eager for 30 steps: its speed, next to the
    python -m train.teacher --latents "$RUNS/latents" --out "$RUNS/teacher_eager" $DEV \
        --init-from "$SHIPPED" --steps 30 --eval-every 0 \
        --eval-clips 4 --batch 128 --log-every 10        # compiled teacher's in its own log
fi
python -m train.teacher --latents "$RUNS/latents" --init-from "$SHIPPED" \
    --out "$RUNS/teacher" $DEV $TEACHER --log-every 100
python -m train.distill --teacher "$RUNS/teacher" --latents "$RUNS/latents" --out "$RUNS/student" \
    $DEV $DISTILL --log-every 50
wait
