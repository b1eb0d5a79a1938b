#!/usr/bin/env bash
# bench/gpu/gpu_scale.py on the GPU machine: one part per device run (nf4: 7B nf4 under a 24 GiB cap, SPEFT end to
# end against QLoRA; bf16: 7B bf16 at 2048 tokens, SPEFT's two delta implementations against LoRA, MFU).
# Planned at about 6 minutes each (the 7B model's writing and loading included), 7 at most.
#
# First here: python bench/gpu/gpu_wheels.py (the wheels into .whl/); then the device tool's run with
#   command: bash bench/gpu/gpu_scale.sh nf4    carry: [".whl"]    timeout_s: 450
#   command: bash bench/gpu/gpu_scale.sh bf16   carry: [".whl"]    timeout_s: 450
# Give the machine back between them if the first fails. What comes back under $OUT: gpu_scale_PART.md (the
# section also appended to docs/gpu_checks.md there: copy it over), gpu_checks.md and each job's log.
# Exit codes: 0 every job ran; 2 a job failed or the part ran out of time (what ran is still written);
# 3 installing failed; 4 no CUDA device.

part=${1:?usage: bash bench/gpu/gpu_scale.sh nf4|bf16}
source "$(dirname "$0")/gpu_env.sh"
# What is left of 7 minutes: the script stops its jobs in time to write what ran before the tool's limit.
left=$(( 420 - SECONDS )); [ "$left" -lt 60 ] && left=60
"$PY" bench/gpu/gpu_scale.py "$part" --out "$OUT" --time_limit_s "$left" 2>&1 | tee "$OUT/gpu_scale_$part.log"
rc=${PIPESTATUS[0]}
cp docs/gpu_checks.md "$OUT/"
exit "$rc"
