#!/bin/bash
# Two machines under SLURM, 4 GPUs each, with configs/two_machines_ddp.yaml: srun starts one
# launcher per machine, each told its rank and the first machine's address.
#   sbatch configs/slurm_two_machines.sh
#SBATCH --job-name=bert-imdb
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one `accelerate launch` per machine; it starts 4 processes
#SBATCH --gpus-per-node=4
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120            # a warning two minutes before the limit: save and stop (docs/faults.md)
#SBATCH --requeue
set -euo pipefail

# torchrun's agent passes SIGUSR1 on only when told to, and gives the processes this long to save.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 PET_SHUTDOWN_TIMEOUT=100
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RESUME=()
if ls -d results/checkpoint-* >/dev/null 2>&1; then RESUME=(--resume_from_checkpoint latest); fi

# --output_dir must be on a filesystem both machines see (this script's working directory is).
srun bash -c "exec accelerate launch --config_file configs/two_machines_ddp.yaml \
    --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_IP --num_processes $((SLURM_NNODES * 4)) \
    train_loop.py ${RESUME[*]:-}"
