#!/bin/bash
# MPNet pretraining on N nodes under SLURM that survives preemption and time limits by requeueing itself.
#
#   RUN_DIR=/shared/runs/base sbatch --nodes=4 --gpus-per-node=8 slurm/pretrain.sh
#   RUN_DIR=/shared/runs/base LAUNCH_CONFIG=launch_configs/accelerate/deepspeed_zero2.yaml sbatch slurm/pretrain.sh
#
# One task per node: srun starts one `accelerate launch` per node, which starts GPUS_PER_NODE training
# processes. Before the time limit (--signal below) or on `scancel --signal=USR1 --batch JOBID`, this script
# touches $RUN_DIR/PREEMPT; every rank sees it, they agree at the next step boundary, save step-N, write
# $RUN_DIR/PREEMPTED and exit 0. The script turns that marker into `scontrol requeue`, and the requeued job
# resumes from the newest complete checkpoint (--resume). A file is used, not a signal to the workers,
# because the torch elastic agent under `accelerate launch` does not forward SIGUSR1. A requeued job may get
# fewer or more nodes/GPUs (e.g. sbatch --nodes=2-4): it starts one process per GPU it has and resumes on them;
# put --global-batch-size in ARGS to keep the batch (README.md, "Changing the number of GPUs").
#
# Environment (sbatch exports the submitting shell's environment):
#   RUN_DIR        run/checkpoint directory on a filesystem all nodes share (default: ./runs/$SLURM_JOB_NAME)
#   RECIPE         training recipe YAML (default: launch_configs/recipes/mpnet_base.yaml; set RECIPE= for none)
#   ARGS           more training flags, split on spaces, e.g. "--total-updates 125000 --batch-size 32"
#   LAUNCH_CONFIG  Accelerate config (default: launch_configs/accelerate/ddp_8gpu.yaml; for DeepSpeed use a
#                  deepspeed_zero*.yaml: they set deepspeed_multinode_launcher: standard, which srun needs)
#   GPUS_PER_NODE  training processes per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   MASTER_ADDR    how the other nodes reach the head (default: its name from `scontrol show hostnames`; set an
#                  address or a name on another network, e.g. node01-ib, to choose the network)
#   MASTER_PORT    rendezvous port on the head node (default: 10000 + job id % 50000, so jobs sharing a
#                  node do not collide and a requeued job gets the same one)
#   RDZV_TIMEOUT   seconds the launchers wait for each other at start (default: 60)
#   GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME  the network interface, where the route to MASTER_ADDR is not the one
#                  to use (default: training picks the interface whose address routes to the head)
#   MAX_REQUEUES   stop requeueing after this many restarts (default: 100)
# GPUs are requested on the sbatch command line (--gpus-per-node=8 or --gres=gpu:8, as your site wants).
# A node that dies ends the whole step (srun --kill-on-bad-exit); a node that hangs or drops off the network is
# detected by the training processes' heartbeat (--node-timeout-s) and ends it the same way.
#
#SBATCH --job-name=mpnet-dist
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
: "${SLURM_JOB_ID:?submit this script with sbatch (it needs a SLURM allocation)}"

export RUN_DIR=${RUN_DIR:-$PWD/runs/${SLURM_JOB_NAME:-mpnet-dist}}
export RECIPE=${RECIPE-launch_configs/recipes/mpnet_base.yaml}
export ARGS=${ARGS:-}
export LAUNCH_CONFIG=${LAUNCH_CONFIG:-launch_configs/accelerate/ddp_8gpu.yaml}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 50000))}
export RDZV_TIMEOUT=${RDZV_TIMEOUT:-60}
MAX_REQUEUES=${MAX_REQUEUES:-100}
JOB=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
JOB=${JOB:-$SLURM_JOB_ID}

# The first node of the allocation is the rendezvous host. No fallback to localhost: that would make every
# node a world of its own and hang.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [ -z "$HEAD_NODE" ]; then
  echo "[pretrain.sh] cannot find the head node: 'scontrol show hostnames $SLURM_JOB_NODELIST' printed nothing" >&2
  exit 1
fi
export MASTER_ADDR=${MASTER_ADDR:-$HEAD_NODE}
mkdir -p "$RUN_DIR"
echo "[pretrain.sh] $(date '+%F %T') job $JOB restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES node(s) x" \
  "$GPUS_PER_NODE process(es), head $MASTER_ADDR:$MASTER_PORT, $LAUNCH_CONFIG, run dir $RUN_DIR"

STOP=0
request_stop() {
  echo "[pretrain.sh] $(date '+%F %T') stop signal: asking training to save at the next step and exit"
  STOP=1
  touch "$RUN_DIR/PREEMPT"
}
trap request_stop USR1

# Single quotes: each node's task expands its own SLURM_NODEID (in this shell it would be 0 everywhere).
# Each node first checks that it has a route to the head (one line and exit 2 if not, instead of the launcher
# retrying for RDZV_TIMEOUT); --kill-on-bad-exit then ends every node's task when one fails.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'set -o pipefail
  python -m mpnet_dist network "$MASTER_ADDR" | sed "s/^/[pretrain.sh] node $SLURM_NODEID: /" || exit 2
  exec accelerate launch --config_file "$LAUNCH_CONFIG" \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --rdzv_conf "timeout=$RDZV_TIMEOUT" \
    --rdzv_backend static --same_network --deepspeed_multinode_launcher standard \
    -m mpnet_dist.train ${RECIPE:+--config "$RECIPE"} $ARGS --checkpoint-dir "$RUN_DIR" --resume
' &
SRUN=$!

# Bash runs a trap only between commands, so wait on the background srun (wait returns early on a signal).
# After a stop request keep touching the file until srun ends: training deletes a stale PREEMPT file when it
# starts, so a request that arrives during start-up would otherwise be lost.
while kill -0 "$SRUN" 2>/dev/null; do
  if [ "$STOP" = 1 ]; then
    touch "$RUN_DIR/PREEMPT"
    sleep 2
  else
    wait "$SRUN" || true
  fi
done
rc=0
wait "$SRUN" || rc=$?

if [ -f "$RUN_DIR/PREEMPTED" ]; then
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    echo "[pretrain.sh] saved step $(cat "$RUN_DIR/PREEMPTED"), but already requeued $MAX_REQUEUES times" \
      "(MAX_REQUEUES): not requeueing; resubmit the same command to go on" >&2
    exit 1
  fi
  echo "[pretrain.sh] $(date '+%F %T') training saved step $(cat "$RUN_DIR/PREEMPTED"); requeueing job $JOB"
  scontrol requeue "$JOB"
  exit 0
fi
echo "[pretrain.sh] $(date '+%F %T') training exited with code $rc"
exit "$rc"
