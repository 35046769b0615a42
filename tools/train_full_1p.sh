#!/usr/bin/env bash
# Decompose and fine-tune on one process (the reference's train_full_1p.sh), logging to OUTPUT_DIR.
#
#   bash tools/train_full_1p.sh [--data_path DIR] [--output_dir DIR] [train.py options ...]
#
# Examples:
#   bash tools/train_full_1p.sh --no-decompose --epochs 10 --output_dir output/original
#   bash tools/train_full_1p.sh --checkpoint output/original/model.pt --ratio 0.5 --output_dir output/1p
#
# Without --data_path it trains on scikit-learn's digits. OUTPUT_DIR (default ./output/1p) receives
# train.log, metrics.json, decompose_config.json, decomposed_init.pt and model.pt. Every other option
# goes to tools/train.py unchanged (python3 tools/train.py --help lists them). PYTHON selects the
# interpreter (default python3).
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: bash tools/train_full_1p.sh [--data_path DIR] [--output_dir DIR] [train.py options ...]

  --data_path DIR    class-per-folder images (default: scikit-learn's digits)
  --output_dir DIR   where train.log, metrics.json and the state dicts go (default ./output/1p)
  -h, --help         this message; 'python3 tools/train.py --help' lists the training options
USAGE
}

die() {
    echo "train_full_1p.sh: error: $*" >&2
    exit 2
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
data_path=""
output_dir="./output/1p"
passthrough=()

while (($# > 0)); do
    case "$1" in
        --data_path=*) data_path="${1#*=}" ;;
        --data_path) (($# >= 2)) || die "--data_path needs a folder"; data_path="$2"; shift ;;
        --output_dir=*) output_dir="${1#*=}" ;;
        --output_dir) (($# >= 2)) || die "--output_dir needs a folder"; output_dir="$2"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) passthrough+=("$1") ;;
    esac
    shift
done

if [[ -n "$data_path" && ! -d "$data_path" ]]; then
    die "--data_path '$data_path' is not a folder"
fi
[[ -n "$output_dir" ]] || die "--output_dir must not be empty"

umask 027
mkdir -p "$output_dir"
log="$output_dir/train.log"

command=("$PYTHON" "$ROOT/tools/train.py" --save "$output_dir" --metrics "$output_dir/metrics.json")
if [[ -n "$data_path" ]]; then
    command+=(--data_path "$data_path")
fi
command+=(${passthrough[@]+"${passthrough[@]}"})

echo "running: ${command[*]}" | tee "$log"
started=$(date +%s)
"${command[@]}" 2>&1 | tee -a "$log"
echo "E2E training duration: $(($(date +%s) - started)) s; log $log, metrics $output_dir/metrics.json" | tee -a "$log"
