#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM slice with one command, in the style of
# big_vision's run_tpu.sh: ships this checkout's committed HEAD to each worker, installs
# it there in a venv with JAX for TPU, and starts `python -m ntxr.main --distributed`
# with your flags on all workers at once. JAX finds the slice's processes by itself;
# each process feeds its own rows of every global batch.
#
# Each worker needs --config.data_dir (a persistent disk or a bucket mount) and prepares
# its own --config.cache_dir (default ~/.cache/ntxr on its disk, kept between launches),
# or shares one in a bucket (--config.cache_dir=gs://...: prepared once, then downloaded).
# --workdir is required: a folder every worker sees (a shared file system, or a bucket:
# gs://...), outside the code. The code goes to ~/ntxr-COMMIT, a folder per commit;
# nothing is deleted, so a relaunch (after a preemption, say) resumes the run.
#
#   launch/run_tpu.sh TPU_NAME ZONE --strategy=hard_cross --config.data_dir=/mnt/clotho \
#       --config=ntxr/configs/paper.py --workdir=/mnt/shared/runs/hard_cross
#   DRY_RUN=1 launch/run_tpu.sh ...   # print the commands instead of running them
#
# The flags' settings are checked here first (python -m ntxr.main --check_settings): a
# mistake ends in one line before anything is shipped or started.
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 TPU_NAME ZONE [ntxr.main flags...]" >&2
  exit 2
fi
name=$1 zone=$2
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/launch/common.sh"
require_workdir "$@"
check_settings "$root/.venv" "$@"
archive=${TMPDIR:-/tmp}/ntxr-$name.tar.gz
code=ntxr-$(git -C "$root" rev-parse --short=12 HEAD)

remote="mkdir -p $code && tar -xzf ntxr.tar.gz -C $code && cd $code"
remote+=" && python3 -m venv .venv && . .venv/bin/activate"
remote+=" && pip install -q -e . 'jax[tpu]>=0.10,<0.11'"
remote+=" && python -m ntxr.main --distributed${1:+ $(quote_all "$@")}"

run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name:ntxr.tar.gz" --zone="$zone" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
