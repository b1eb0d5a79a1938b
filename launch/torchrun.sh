#!/usr/bin/env bash
# speft-ds under torchrun, for clusters that start jobs with it. Run on every node with the same flags
# (train.py's, after the script):
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 launch/torchrun.sh --ds_config ds_configs/z3_cluster.json ...
#
# Environment it reads: NNODES (default 1), NODE_RANK (default 0), NPROC_PER_NODE (default: the GPUs
# torch sees, at least 1), MASTER_ADDR (default 127.0.0.1), MASTER_PORT (default 29500).
set -euo pipefail

NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" "$(dirname "$0")/train.py" "$@"
