#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM slice with one command, in the style of
# big_vision's run_tpu.sh: ships this checkout's committed HEAD to each worker, installs
# it there in a venv with JAX for TPU, and starts `python -m ntxr.main --distributed`
# with your flags on all workers at once. JAX finds the slice's processes by itself;
# each process feeds its own rows of every global batch. --config.data_dir must exist on every
# worker (a persistent disk or a bucket mount).
#
#   launch/run_tpu.sh TPU_NAME ZONE --strategy=hard_cross --config.data_dir=/mnt/clotho \
#       --config=ntxr/configs/paper.py
#   DRY_RUN=1 launch/run_tpu.sh ...   # print the commands instead of running them
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 TPU_NAME ZONE [ntxr.main flags...]" >&2
  exit 2
fi
name=$1 zone=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/launch/common.sh"
archive=${TMPDIR:-/tmp}/ntxr-$name.tar.gz

remote="rm -rf ntxr && mkdir ntxr && tar -xzf ntxr.tar.gz -C ntxr && cd ntxr"
remote+=" && python3 -m venv .venv && . .venv/bin/activate"
remote+=" && pip install -q -e . 'jax[tpu]>=0.10,<0.11'"
remote+=" && python -m ntxr.main --distributed${1:+ $(quote_all "$@")}"

run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name:ntxr.tar.gz" --zone="$zone" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
