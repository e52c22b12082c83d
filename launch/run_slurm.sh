#!/usr/bin/env bash
# Trains on a SLURM GPU cluster: one process per node, each using all of its node's
# GPUs, started together by srun; `python -m ntxr.main --distributed` lets JAX find the
# job's processes from SLURM's variables. Needs a venv with ntxr and JAX for CUDA
# (pip install -e . 'jax[cuda12]>=0.10,<0.11') on a shared file system.
#
# --workdir is required (on the shared file system, outside the code): resubmitting the
# same command resumes the run. Every node reads --config.data_dir and prepares into
# --config.cache_dir; put both on the shared file system to prepare once.
#
#   NODES=2 GPUS_PER_NODE=8 launch/run_slurm.sh --strategy=hard_cross \
#       --config.data_dir=/shared/clotho --config=ntxr/configs/paper.py \
#       --config.cache_dir=/shared/ntxr-cache --workdir=/shared/runs/hard_cross
#   DRY_RUN=1 launch/run_slurm.sh ...   # print the batch script instead of submitting it
#
# The flags' settings are checked here first (python -m ntxr.main --check_settings): a
# mistake ends in one line before anything is submitted.
#
# Settings (environment): NODES (1), GPUS_PER_NODE (8), CPUS_PER_NODE (16),
# TIME (24:00:00), PARTITION (the cluster's default), VENV (this checkout's .venv).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/launch/common.sh"
require_workdir "$@"
venv=${VENV:-$root/.venv}
check_settings "$venv" "$@"

script="#!/bin/bash
#SBATCH --job-name=ntxr
#SBATCH --nodes=${NODES:-1}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${GPUS_PER_NODE:-8}
#SBATCH --cpus-per-task=${CPUS_PER_NODE:-16}
#SBATCH --time=${TIME:-24:00:00}
#SBATCH --output=$root/slurm-%j.out${PARTITION:+
#SBATCH --partition=$PARTITION}
set -euo pipefail
cd $(quote "$root")
. $(quote "$venv/bin/activate")
srun python -m ntxr.main --distributed${1:+ $(quote_all "$@")}"

if [ -n "${DRY_RUN:-}" ]; then
  echo "$script"
  exit 0
fi
if [ ! -f "$venv/bin/activate" ]; then
  echo "error: no venv at $venv (set VENV, or make one: python3 -m venv $venv &&" \
       "$venv/bin/pip install -e $root 'jax[cuda12]>=0.10,<0.11')" >&2
  exit 1
fi
echo "$script" | sbatch
