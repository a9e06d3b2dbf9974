#!/usr/bin/env bash
# Evaluate a finished run: average the last checkpoints, translate the test set with beam 5,
# score detokenised output with sacreBLEU (signature printed) and report fairseq's BLEU too.
#
# Usage: bash scripts/evaluate.sh CHECKPOINT_DIR
# Environment (optional):
#   NUM_AVG=5        how many of the newest checkpoints to average (epoch ones, else update ones)
#   DATA_BIN         default: the task.data stored in the checkpoint
#   REF              raw test reference; default: DATA_BIN/../raw/test.TGT (prepare scripts' layout)
#   BEAM=5 LENPEN=1.0 GEN_SUBSET=test BATCH_SIZE=128   CPU=1 (default: when no CUDA device)
# Writes CHECKPOINT_DIR/{checkpoint_avg.pt, generate-test.txt, eval.json}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -eq 1 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
CKPT_DIR="$(realpath "$1")"
if ! command -v fairseq-generate >/dev/null 2>&1; then
  # shellcheck disable=SC1091
  source "$ROOT/scripts/setup_env.sh"
fi
cd "$ROOT"

echo "== averaging the last ${NUM_AVG:-5} checkpoints of $CKPT_DIR"
python -m dsq_fairseq.tools.average_checkpoints "$CKPT_DIR" "$CKPT_DIR/checkpoint_avg.pt" \
  --num "${NUM_AVG:-5}" | tee "$CKPT_DIR/averaged.json"

read -r CK_DATA SRC TGT < <(python - "$CKPT_DIR/checkpoint_avg.pt" <<'PY'
import sys
import torch
import dsq_fairseq  # noqa: F401
task = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["cfg"]["task"]
print(task["data"], task["source_lang"], task["target_lang"])
PY
)
DATA_BIN="${DATA_BIN:-$CK_DATA}"
REF="${REF:-$(dirname "$DATA_BIN")/raw/test.$TGT}"
[ -s "$REF" ] || { echo "error: reference $REF missing (set REF=raw test file)" >&2; exit 2; }
CPU="${CPU:-$(python -c 'import torch; print(int(not torch.cuda.is_available()))')}"
CPU_ARGS=(); [ "$CPU" != 1 ] || CPU_ARGS=(--cpu)
GEN_SUBSET="${GEN_SUBSET:-test}"
GEN_OUT="$CKPT_DIR/generate-$GEN_SUBSET.txt"

echo "== fairseq-generate ($GEN_SUBSET, beam ${BEAM:-5}) -> $GEN_OUT"
fairseq-generate "$DATA_BIN" --user-dir "$ROOT/dsq_fairseq" --path "$CKPT_DIR/checkpoint_avg.pt" \
  --source-lang "$SRC" --target-lang "$TGT" --gen-subset "$GEN_SUBSET" \
  --beam "${BEAM:-5}" --lenpen "${LENPEN:-1.0}" --batch-size "${BATCH_SIZE:-128}" \
  --required-batch-size-multiple 1 --remove-bpe sentencepiece --scoring bleu "${CPU_ARGS[@]}" \
  > "$GEN_OUT" 2> "$CKPT_DIR/generate.log"
FAIRSEQ_BLEU="$(grep -o 'BLEU4 = [0-9.]*' "$GEN_OUT" | tail -1 | awk '{print $3}')"

echo "== sacreBLEU (detokenised) against $REF"
python -m dsq_fairseq.data.score "$GEN_OUT" "$REF" --json "$CKPT_DIR/sacrebleu.json"
python - "$CKPT_DIR" "$FAIRSEQ_BLEU" "$REF" <<'PY'
import json
import sys
from pathlib import Path

ckpt_dir, fairseq_bleu, ref = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
score = json.loads((ckpt_dir / "sacrebleu.json").read_text())
averaged = json.loads((ckpt_dir / "averaged.json").read_text())["averaged"]
result = {
    "bleu": score["bleu"],
    "signature": score["signature"],
    "fairseq_tokenized_bleu": float(fairseq_bleu) if fairseq_bleu else None,
    "hypotheses": score["n"],
    "reference": ref,
    "checkpoints_averaged": averaged,
}
(ckpt_dir / "eval.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
PY
