#!/usr/bin/env bash
# Decompose and fine-tune on N processes with torchrun + DDP (the reference's train_full_8p.sh).
#
#   bash tools/train_full_np.sh --nproc N [--data_path DIR] [--output_dir DIR] [train.py options ...]
#
# One machine:
#   bash tools/train_full_np.sh --nproc 2 --checkpoint output/original/model.pt --ratio 0.5
# Several machines (run on each; OUTPUT_DIR on a filesystem every node sees):
#   bash tools/train_full_np.sh --nproc 8 --nnodes 2 --node_rank 0 --rdzv_endpoint host0:29400 \
#       --output_dir /shared/run1 --checkpoint /shared/original.pt
#   bash tools/train_full_np.sh --nproc 8 --nnodes 2 --node_rank 1 --rdzv_endpoint host0:29400 \
#       --output_dir /shared/run1 --checkpoint /shared/original.pt
#
# Before launching, tools/train.py --dry_run checks the options, the data (enough for every process),
# the checkpoint and the decomposition options in one process, so bad input ends with one line and
# exit code 2 before any worker starts. Rank 0 decomposes once and saves decomposed_init.pt in
# OUTPUT_DIR; every rank rebuilds the structure (do_decompose_weight=False) and loads it.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: bash tools/train_full_np.sh --nproc N [--data_path DIR] [--output_dir DIR] [train.py options ...]

  --nproc N              processes on this machine (required)
  --nnodes M             machines (default 1)
  --node_rank K          this machine's rank, 0..M-1 (default 0; with --nnodes > 1)
  --rdzv_endpoint H:P    rendezvous host:port, the same on every machine (required with --nnodes > 1)
  --rdzv_id ID           job id shared by the machines (default lowrank-train)
  --data_path DIR        class-per-folder images (default: scikit-learn's digits)
  --output_dir DIR       train.log, metrics.json, state dicts (default ./output/np; shared with --nnodes > 1)
  -h, --help             this message; 'python3 tools/train.py --help' lists the training options
USAGE
}

die() {
    echo "train_full_np.sh: error: $*" >&2
    exit 2
}

is_count() {
    [[ "$1" =~ ^[0-9]+$ ]] && (($1 > 0))
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
nproc=""
nnodes=1
node_rank=0
rdzv_endpoint=""
rdzv_id="lowrank-train"
data_path=""
output_dir="./output/np"
passthrough=()

need() {
    (($2 >= 2)) || die "$1 needs a value"
}

while (($# > 0)); do
    case "$1" in
        --nproc=*) nproc="${1#*=}" ;;
        --nproc) need "$1" $#; nproc="$2"; shift ;;
        --nnodes=*) nnodes="${1#*=}" ;;
        --nnodes) need "$1" $#; nnodes="$2"; shift ;;
        --node_rank=*) node_rank="${1#*=}" ;;
        --node_rank) need "$1" $#; node_rank="$2"; shift ;;
        --rdzv_endpoint=*) rdzv_endpoint="${1#*=}" ;;
        --rdzv_endpoint) need "$1" $#; rdzv_endpoint="$2"; shift ;;
        --rdzv_id=*) rdzv_id="${1#*=}" ;;
        --rdzv_id) need "$1" $#; rdzv_id="$2"; shift ;;
        --data_path=*) data_path="${1#*=}" ;;
        --data_path) need "$1" $#; data_path="$2"; shift ;;
        --output_dir=*) output_dir="${1#*=}" ;;
        --output_dir) need "$1" $#; output_dir="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) passthrough+=("$1") ;;
    esac
    shift
done

[[ -n "$nproc" ]] || { usage >&2; die "--nproc N is required"; }
is_count "$nproc" || die "--nproc must be a whole number > 0, got '$nproc'"
is_count "$nnodes" || die "--nnodes must be a whole number > 0, got '$nnodes'"
[[ "$node_rank" =~ ^[0-9]+$ ]] && ((node_rank < nnodes)) || die "--node_rank must be 0..$((nnodes - 1)), got '$node_rank'"
if ((nnodes > 1)) && [[ -z "$rdzv_endpoint" ]]; then
    die "--nnodes $nnodes needs --rdzv_endpoint HOST:PORT (the same on every machine)"
fi
if [[ -n "$data_path" && ! -d "$data_path" ]]; then
    die "--data_path '$data_path' is not a folder"
fi
[[ -n "$output_dir" ]] || die "--output_dir must not be empty"

data_args=()
if [[ -n "$data_path" ]]; then
    data_args=(--data_path "$data_path")
fi
world_size=$((nproc * nnodes))

# Every check train.py makes before training, for $world_size processes, in one process: one clear line
# and exit code 2 on bad input, before torchrun starts any worker.
"$PYTHON" "$ROOT/tools/train.py" --dry_run --world_size "$world_size" ${data_args[@]+"${data_args[@]}"} \
    ${passthrough[@]+"${passthrough[@]}"}

umask 027
mkdir -p "$output_dir"
log="$output_dir/train.log"
if ((nnodes > 1)); then
    log="$output_dir/train_node$node_rank.log"  # one log per machine in the shared folder
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # train.py sets torch's threads per process itself

if ((nnodes == 1)); then
    launcher=(--standalone --nnodes 1 --nproc_per_node "$nproc")
else
    launcher=(--nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc"
              --rdzv_backend c10d --rdzv_endpoint "$rdzv_endpoint" --rdzv_id "$rdzv_id")
fi
command=("$PYTHON" -m torch.distributed.run "${launcher[@]}" "$ROOT/tools/train.py"
         --save "$output_dir" --metrics "$output_dir/metrics.json" ${data_args[@]+"${data_args[@]}"}
         ${passthrough[@]+"${passthrough[@]}"})

echo "running: ${command[*]}" | tee "$log"
started=$(date +%s)
"${command[@]}" 2>&1 | tee -a "$log"
echo "E2E training duration: $(($(date +%s) - started)) s on $world_size processes; log $log, metrics $output_dir/metrics.json" | tee -a "$log"
