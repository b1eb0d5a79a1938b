"""The machinery every method runs on: DeepSpeed ZeRO-3 access (zero3.py, the one module on ZeRO-3's
internals), the process group, per-rank collectives and lost ranks (distributed.py), what the launcher or MPI
set (launch_env.py), DeepSpeed configs (ds_config/), checkpoints (checkpoint.py), the memory planner
(memory_plan.py), safetensors files written one tensor at a time (safetensors_stream.py), metrics.jsonl
and the trackers (metrics_log.py, trackers.py), the run's summary (run_summary.py) and the libraries'
messages silenced at import (library_noise.py). It may import config/
and models/ (zero3.py reads quantized weights through models/bnb_weights.py), never data/, methods/,
commands/ or the top-level modules.
"""
