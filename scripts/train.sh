#!/usr/bin/env bash
# Train one row of the paper's tables with fairseq-hydra-train.
#
# Usage: bash scripts/train.sh DATASET ROW [HYDRA_OVERRIDE ...]
#   DATASET  iwslt17 | wmt14            (configs/DATASET/base.yaml: the paper's hyper-parameters)
#   ROW      a file configs/DATASET/ROW.yaml: fp32 fixed32 fixed16 bfp32 bfp16 stash_fixed
#            stash_bfp dsq (Table 1), stash_bfp_16_2_2_16 stash_bfp_16_8_8_16 stash_bfp_8_4_4_16
#            (Table 4), fixed_8_8_8_32 fixed_8_8_8_16 fixed_8_8_8_8 (Table 5)
#   extra arguments are hydra overrides, e.g. +model.encoder_layers=2 (keys absent from the YAML
#   need a leading +)
#
# Scale knobs (environment; unset = the paper's setting):
#   DATA_BIN=data/DATASET/data-bin   SAVE_DIR=runs/DATASET/ROW
#   MAX_UPDATE, MAX_EPOCH            training length
#   ARCH                             model architecture, e.g. dsq_transformer_demo (small)
#   MAX_TOKENS, PATIENCE, SEED, LOG_INTERVAL, WARMUP_UPDATES, LR
#   CPU=1                            force CPU (default: CPU when torch sees no CUDA device)
# Writes SAVE_DIR/{checkpoint*.pt, train.log, run.json, dsq_cost.json}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 2 ]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
DATASET="$1"; ROW="$2"; shift 2
CONFIG_DIR="$ROOT/configs/$DATASET"
[ -f "$CONFIG_DIR/base.yaml" ] || { echo "error: unknown dataset '$DATASET' (allowed: $(ls "$ROOT/configs" | grep -v demo | tr '\n' ' '))" >&2; exit 2; }
if [ "$ROW" = base ] || [ ! -f "$CONFIG_DIR/$ROW.yaml" ]; then
  echo "error: unknown row '$ROW' (allowed: $(cd "$CONFIG_DIR" && ls ./*.yaml | sed 's|./||; s|.yaml||' | grep -v '^base$' | tr '\n' ' '))" >&2
  exit 2
fi
if ! command -v fairseq-hydra-train >/dev/null 2>&1; then
  # shellcheck disable=SC1091
  source "$ROOT/scripts/setup_env.sh"
fi

DATA_BIN="$(realpath -m "${DATA_BIN:-$ROOT/data/$DATASET/data-bin}")"
SAVE_DIR="$(realpath -m "${SAVE_DIR:-$ROOT/runs/$DATASET/$ROW}")"
[ -d "$DATA_BIN" ] || { echo "error: DATA_BIN=$DATA_BIN does not exist (run scripts/$DATASET/prepare.sh)" >&2; exit 2; }
mkdir -p "$SAVE_DIR"

OVERRIDES=("task.data=$DATA_BIN" "checkpoint.save_dir=$SAVE_DIR" "common.user_dir=$ROOT/dsq_fairseq"
           "hydra.run.dir=$SAVE_DIR/hydra")
if [ -n "${MAX_UPDATE:-}" ]; then
  OVERRIDES+=("optimization.max_update=$MAX_UPDATE" "optimization.max_epoch=${MAX_EPOCH:-0}")
elif [ -n "${MAX_EPOCH:-}" ]; then
  OVERRIDES+=("optimization.max_epoch=$MAX_EPOCH")
fi
[ -z "${ARCH:-}" ] || OVERRIDES+=("model._name=$ARCH")
[ -z "${MAX_TOKENS:-}" ] || OVERRIDES+=("dataset.max_tokens=$MAX_TOKENS")
[ -z "${PATIENCE:-}" ] || OVERRIDES+=("model.dsq_patience=$PATIENCE")
[ -z "${SEED:-}" ] || OVERRIDES+=("common.seed=$SEED")
[ -z "${LOG_INTERVAL:-}" ] || OVERRIDES+=("common.log_interval=$LOG_INTERVAL")
[ -z "${WARMUP_UPDATES:-}" ] || OVERRIDES+=("lr_scheduler.warmup_updates=$WARMUP_UPDATES")
[ -z "${LR:-}" ] || OVERRIDES+=("optimization.lr=[$LR]")
CPU="${CPU:-$(python -c 'import torch; print(int(not torch.cuda.is_available()))')}"
[ "$CPU" != 1 ] || OVERRIDES+=("common.cpu=true")

python - "$SAVE_DIR/run.json" "$DATASET" "$ROW" "$CONFIG_DIR/$ROW.yaml" "$@" <<'PY'
import json, sys
import yaml
out, dataset, row, path, *extra = sys.argv[1:]
with open(path) as f:
    cfg = yaml.safe_load(f)
with open(path) as f:
    comment = f.readline().lstrip("# ").strip()
json.dump({"dataset": dataset, "row": row, "description": comment,
           "format": cfg["model"]["dsq_format"], "schedule": cfg["model"]["dsq_schedule"],
           "overrides": extra}, open(out, "w"), indent=2)
PY
echo "+ fairseq-hydra-train --config-dir $CONFIG_DIR --config-name $ROW ${OVERRIDES[*]} $*"
fairseq-hydra-train --config-dir "$CONFIG_DIR" --config-name "$ROW" "${OVERRIDES[@]}" "$@" \
  2>&1 | tee -a "$SAVE_DIR/train.log"
