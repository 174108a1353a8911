#!/usr/bin/env bash
# Train item-jax on a Cloud TPU VM or pod slice (see docs/LAUNCH.md):
#   launch/tpu_pod.sh create NAME [--accelerator-type v4-32] [--queued] [--spot]
#   launch/tpu_pod.sh run NAME --config configs/item_base.py [--config.x=y ...]
#   launch/tpu_pod.sh logs|stop|status|delete NAME
# Every subcommand takes --project, --zone, --accelerator-type, --runtime-version,
# --bucket (or ITEM_JAX_* environment variables) and --dry-run, which prints
# the gcloud commands instead of running them. Needs python3 and gcloud only:
# the launcher (item_jax/launch/tpu_pod.py) uses the standard library.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m item_jax.launch.tpu_pod "$@"
