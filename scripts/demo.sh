#!/usr/bin/env bash
# End-to-end demo: toy corpus -> sentencepiece + fairseq-preprocess -> DSQ training (CPU)
# -> beam search -> sacreBLEU -> cost report.  A few minutes on 2 CPU cores.
#
# Usage: bash scripts/demo.sh [DATA_BIN]
#   no argument: build the synthetic de->en toy corpus into $DEMO_DIR and use it
#   DATA_BIN:    use an existing fairseq data-bin (joined dict, sentencepiece pieces);
#                REF=raw_test_reference_file for sacreBLEU on raw text, otherwise only
#                fairseq's own --scoring sacrebleu line is reported.
#
# Environment (all optional):
#   DEMO_DIR=demo_out          output directory (corpus, data-bin, checkpoints, logs)
#   USE_PLUGIN=1               0: plain fairseq baseline (task translation, small
#                              transformer_iwslt_de_en, no --dsq-* flags)
#   TASK, ARCH, USER_DIR       override task / architecture / --user-dir (USER_DIR= drops it)
#   CRITERION                  default dsq_label_smoothed_cross_entropy (plugin; fairseq's
#                              label_smoothed_cross_entropy with the same numbers and less memory)
#   DSQ_FORMAT=bfp  DSQ_SCHEDULE="4,4,4,16;8,4,4,16;16,4,4,16"  DSQ_PATIENCE=1
#   DSQ_MIN_DELTA=0.05         (plugin only; the level rises when a validation round improves
#                              the loss by <= 0.05)
#   VALIDATE_EVERY=30          validation (= schedule round) every N updates, and at epoch ends
#   MAX_EPOCH=4  WARMUP=100    training epochs / inverse-sqrt warm-up updates
#   OPTIMIZER=adam             fairseq optimizer, e.g. dsq_adam (quantized Adam moments; its
#                              --dsq-adam-* flags go in EXTRA_TRAIN_ARGS)
#   EXTRA_TRAIN_ARGS, EXTRA_GEN_ARGS   extra flags appended to fairseq-train / fairseq-generate
#   GEN_TASK=$TASK             --task used for fairseq-generate
#   BEAM=5  GEN_SUBSET=test    beam size / split to translate
#   TOY_TRAIN=20000 TOY_VALID=500 TOY_TEST=500 TOY_SEED=1 SPM_VOCAB=1000   toy corpus
#   SRC=de TGT=en              language pair
#   RESUME=1                   keep $DEMO_DIR/checkpoints (default: retrain from scratch)
#   DEMO_SKIP_SETUP=1          do not source scripts/setup_env.sh (use the active/.venv env)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
T_START=$SECONDS
stage() { echo; echo "=== [demo $((SECONDS - T_START))s] $* ==="; }
die() { echo "ERROR: $*" >&2; exit 1; }

abspath() { # absolute path of a (possibly not yet existing) file/dir, relative to the caller's cwd
  case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac
}

DATA_BIN_ARG="${1:-}"
[ $# -le 1 ] || die "usage: $0 [DATA_BIN]"
DEMO_DIR="$(abspath "${DEMO_DIR:-$ROOT/demo_out}")"
[ -z "$DATA_BIN_ARG" ] || DATA_BIN_ARG="$(abspath "$DATA_BIN_ARG")"
REF="${REF:-}"
[ -z "$REF" ] || REF="$(abspath "$REF")"
SRC="${SRC:-de}"
TGT="${TGT:-en}"
export SRC TGT

cd "$ROOT"

# ---------------------------------------------------------------------------------------------
stage "environment"
if [ "${DEMO_SKIP_SETUP:-0}" != 1 ]; then
  # shellcheck disable=SC1091
  source scripts/setup_env.sh
  cd "$ROOT"
elif [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
for tool in python fairseq-train fairseq-generate fairseq-preprocess; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (run: source scripts/setup_env.sh)"
done
echo "python: $(command -v python)  fairseq: $(python -c 'import fairseq; print(fairseq.__version__)')"
mkdir -p "$DEMO_DIR"

# ---------------------------------------------------------------------------------------------
USE_PLUGIN="${USE_PLUGIN:-1}"
USER_DIR="${USER_DIR-$ROOT/dsq_fairseq}"
PLUGIN_ARGS=()   # plugin-specific fairseq-train flags, only when USE_PLUGIN != 0
ARCH_ARGS=()     # architecture overrides for the plain-fairseq baseline
if [ "$USE_PLUGIN" != 0 ]; then
  TASK="${TASK:-dsq_translation}"
  ARCH="${ARCH:-dsq_transformer_demo}"
  DSQ_FORMAT="${DSQ_FORMAT:-bfp}"
  DSQ_SCHEDULE="${DSQ_SCHEDULE:-4,4,4,16;8,4,4,16;16,4,4,16}"
  DSQ_PATIENCE="${DSQ_PATIENCE:-1}"
  DSQ_MIN_DELTA="${DSQ_MIN_DELTA:-0.05}"
  PLUGIN_ARGS=(--dsq-format "$DSQ_FORMAT" --dsq-schedule "$DSQ_SCHEDULE"
               --dsq-patience "$DSQ_PATIENCE" --dsq-min-delta "$DSQ_MIN_DELTA")
  # fairseq's label-smoothed loss, same numbers, without keeping [tokens, vocab] log-probs
  CRITERION="${CRITERION:-dsq_label_smoothed_cross_entropy}"
  [ -n "$USER_DIR" ] || die "USE_PLUGIN=1 needs USER_DIR (default: $ROOT/dsq_fairseq)"
else
  TASK="${TASK:-translation}"
  CRITERION="${CRITERION:-label_smoothed_cross_entropy}"
  if [ -z "${ARCH:-}" ]; then
    # same size as the demo's DSQ architecture: 2+2 layers, 128 dims, 4 heads, FFN 256
    ARCH=transformer_iwslt_de_en
    ARCH_ARGS=(--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 128
               --decoder-embed-dim 128 --encoder-ffn-embed-dim 256 --decoder-ffn-embed-dim 256
               --encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings)
  fi
fi
GEN_TASK="${GEN_TASK:-$TASK}"
USER_DIR_ARGS=()
[ -z "$USER_DIR" ] || USER_DIR_ARGS=(--user-dir "$USER_DIR")
MAX_EPOCH="${MAX_EPOCH:-4}"
WARMUP="${WARMUP:-100}"
VALIDATE_EVERY="${VALIDATE_EVERY:-30}"
BEAM="${BEAM:-5}"
GEN_SUBSET="${GEN_SUBSET:-test}"
read -r -a EXTRA_TRAIN <<< "${EXTRA_TRAIN_ARGS:-}"
read -r -a EXTRA_GEN <<< "${EXTRA_GEN_ARGS:-}"

# ---------------------------------------------------------------------------------------------
if [ -z "$DATA_BIN_ARG" ]; then
  stage "toy corpus -> $DEMO_DIR/corpus"
  if [ -s "$DEMO_DIR/corpus/test.$TGT" ] && [ "${FORCE:-0}" != 1 ]; then
    echo "corpus exists, reusing (FORCE=1 to regenerate)"
  else
    python -m dsq_fairseq.data.toy_corpus --out "$DEMO_DIR/corpus" --src "$SRC" --tgt "$TGT" \
      --train "${TOY_TRAIN:-20000}" --valid "${TOY_VALID:-500}" --test "${TOY_TEST:-500}" \
      --seed "${TOY_SEED:-1}"
  fi
  stage "sentencepiece + fairseq-preprocess -> $DEMO_DIR/data-bin"
  bash scripts/prepare_data.sh "$DEMO_DIR/corpus" "$DEMO_DIR" "${SPM_VOCAB:-1000}"
  DATA_BIN="$DEMO_DIR/data-bin"
  if [ -z "$REF" ] && [ "$GEN_SUBSET" = test ]; then REF="$DEMO_DIR/raw/test.$TGT"; fi
else
  DATA_BIN="$DATA_BIN_ARG"
  [ -f "$DATA_BIN/dict.$SRC.txt" ] || die "$DATA_BIN/dict.$SRC.txt not found (not a data-bin?)"
  echo "using data-bin $DATA_BIN${REF:+ with raw reference $REF}"
fi
[ -z "$REF" ] || [ -s "$REF" ] || die "reference file $REF missing or empty"
T_DATA=$SECONDS

# ---------------------------------------------------------------------------------------------
stage "train: task=$TASK arch=$ARCH epochs=$MAX_EPOCH ${PLUGIN_ARGS[*]:-(no plugin flags)}"
CKPT_DIR="$DEMO_DIR/checkpoints"
if [ "${RESUME:-0}" != 1 ]; then rm -rf "$CKPT_DIR"; fi
mkdir -p "$CKPT_DIR"
TRAIN_CMD=(fairseq-train "$DATA_BIN" "${USER_DIR_ARGS[@]}" --task "$TASK" --arch "$ARCH"
  --source-lang "$SRC" --target-lang "$TGT"
  "${ARCH_ARGS[@]}" "${PLUGIN_ARGS[@]}"
  --optimizer "${OPTIMIZER:-adam}" --adam-betas '(0.9,0.98)' --lr 1e-3 --lr-scheduler inverse_sqrt
  --warmup-updates "$WARMUP" --validate-interval-updates "$VALIDATE_EVERY" --criterion "$CRITERION" --label-smoothing 0.1
  --dropout 0.1 --max-tokens 4096 --max-epoch "$MAX_EPOCH" --cpu --seed 1
  --save-dir "$CKPT_DIR" --no-epoch-checkpoints --log-format simple --log-interval 50
  "${EXTRA_TRAIN[@]}")
echo "+ ${TRAIN_CMD[*]}"
"${TRAIN_CMD[@]}" 2>&1 | tee "$DEMO_DIR/train.log"
[ -f "$CKPT_DIR/checkpoint_best.pt" ] || die "training produced no $CKPT_DIR/checkpoint_best.pt"
T_TRAIN=$SECONDS

# ---------------------------------------------------------------------------------------------
stage "generate ($GEN_SUBSET, beam $BEAM)"
GEN_OUT="$DEMO_DIR/generate-$GEN_SUBSET.txt"
GEN_CMD=(fairseq-generate "$DATA_BIN" "${USER_DIR_ARGS[@]}" --task "$GEN_TASK"
  --source-lang "$SRC" --target-lang "$TGT" --gen-subset "$GEN_SUBSET"
  --path "$CKPT_DIR/checkpoint_best.pt" --beam "$BEAM" --batch-size 128
  --required-batch-size-multiple 1 --remove-bpe sentencepiece --scoring sacrebleu --cpu
  "${EXTRA_GEN[@]}")
echo "+ ${GEN_CMD[*]} > $GEN_OUT"
"${GEN_CMD[@]}" > "$GEN_OUT" 2> "$DEMO_DIR/generate.log" || {
  tail -n 30 "$DEMO_DIR/generate.log" >&2; die "fairseq-generate failed (see $DEMO_DIR/generate.log)"; }
tail -n 2 "$DEMO_DIR/generate.log"
T_GEN=$SECONDS

# ---------------------------------------------------------------------------------------------
stage "score"
SCORE_JSON="$DEMO_DIR/score.json"
python -m dsq_fairseq.data.score "$GEN_OUT" ${REF:+"$REF"} --json "$SCORE_JSON"

stage "cost report"
if python -c "import importlib.util as u, sys; sys.exit(u.find_spec('dsq_fairseq.cost.report') is None)" 2>/dev/null; then
  python -m dsq_fairseq.cost.report "$CKPT_DIR"
  # the summary tables of the Markdown report (plots and per-round table stay in the file)
  [ ! -s "$CKPT_DIR/report.md" ] || sed -n '/^## Summary/,/^## Plots/p' "$CKPT_DIR/report.md" | sed '$d'
else
  echo "note: dsq_fairseq.cost.report not available, skipping the cost report"
fi

# ---------------------------------------------------------------------------------------------
T_END=$SECONDS
stage "summary"
SUMMARY_MODEL="task=$TASK arch=$ARCH epochs=$MAX_EPOCH ${PLUGIN_ARGS[*]:-(plain fairseq)}"
python - "$SCORE_JSON" "$DATA_BIN" "$SUMMARY_MODEL" "$CKPT_DIR/checkpoint_best.pt" "$GEN_OUT" "$REF" <<'PY'
import json
import sys

score_json, data_bin, model, ckpt, gen_out, ref = sys.argv[1:]
with open(score_json) as f:
    r = json.load(f)
print(f"data-bin        : {data_bin}")
print(f"model           : {model}")
print(f"checkpoint      : {ckpt}")
print(f"hypotheses      : {r['n']}  ({gen_out})")
if r["bleu"] is not None:
    print(f"BLEU            : {r['bleu']:.2f}   (sacreBLEU on detokenised output vs {ref})")
    print(f"signature       : {r['signature']}")
if r["fairseq"]:
    print(f"fairseq scoring : {r['fairseq']}")
PY
echo "wall time       : $((T_END - T_START))s total (data $((T_DATA - T_START))s, train $((T_TRAIN - T_DATA))s, generate $((T_GEN - T_TRAIN))s)"
