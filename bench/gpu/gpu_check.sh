#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU: installs what the machine lacks from carried wheels, runs
# the `gpu` tests (tests/gpu), then bench/gpu/gpu_bench.py (step time and peak GPU memory of SPEFT with each delta
# implementation, LoRA and full fine-tuning on a random ~1.1B LLaMA in bf16, and the salience pass time), which
# appends a dated section to docs/gpu_checks.md. 7.4 minutes on one H200 (2026-12-04), 8 at most.
#
# On this workplace's GPU machine (no network, its own torch and Python 3.12), first here:
#   python bench/gpu/gpu_wheels.py          # the wheels into .whl/, checked against the 64 MiB carry limit
# then the device tool's run with
#   command: bash bench/gpu/gpu_check.sh    carry: [".whl"]    timeout_s: 500
# Two such runs fill a session's 15 device minutes (a start of about 35 s each): after a failure, give the
# machine back, fix, rerun; or rerun the tests alone: "bash bench/gpu/gpu_check.sh --tests-only", timeout_s 200.
# The tool returns what is under $OUT: gpu_checks.md (copy it over docs/gpu_checks.md) and the logs.
#
# Exit codes: 0 all passed; 1 a gpu test failed (the benchmark still ran and was written); 2 the benchmark
# failed or timed out; 3 installing failed; 4 no CUDA device (after the steps that run without one: the
# install and the gpu tests, which then skip).
# Environment: PYTHON (default python3); WHEELS, the wheel folder (default .whl; none installed if it has none);
# OUT, where logs and the updated doc are copied (the device tool sets it; default /tmp/gpu_check).

source "$(dirname "$0")/gpu_env.sh"

timeout 300 "$PY" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
summary="$(tail -n 1 "$OUT/gpu_tests.log" | tr -d '=' | xargs) (exit $tests_rc)"
[ "$tests_rc" -ne 0 ] && say "gpu tests failed: $summary"
[ "${1:-}" = "--tests-only" ] && exit $(( tests_rc != 0 ))

if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  say "no CUDA device visible to torch $("$PY" -c 'import torch; print(torch.__version__)'): gpu tests $summary; stopping before the benchmark"
  exit 4
fi

# What is left of 8 minutes (at least 1), so that the doc and logs come back before the device tool's limit.
left=$(( 480 - SECONDS )); [ "$left" -lt 60 ] && left=60
timeout "$left" "$PY" bench/gpu/gpu_bench.py --tests "$summary" 2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
cp docs/gpu_checks.md "$OUT/"
[ "$tests_rc" -ne 0 ] && exit 1
[ "$bench_rc" -ne 0 ] && { say "the benchmark failed (exit $bench_rc; 124: out of time)"; exit 2; }
say "done: gpu tests $summary; docs/gpu_checks.md has the new section"
