#!/usr/bin/env bash
# Turn raw parallel text into a fairseq data-bin with a joint sentencepiece model.
#
# Usage: bash scripts/prepare_data.sh RAW_DIR OUT_DIR [VOCAB]
#   RAW_DIR/{train,valid,test}.{$SRC,$TGT}  raw (detokenised) text, one sentence per line
#   VOCAB                                   sentencepiece vocabulary size (default 1000)
# Env: SRC/TGT (default de/en), SPM_TYPE (bpe|unigram, default bpe), WORKERS (default 2),
#      FORCE=1 to rebuild even if OUT_DIR/data-bin/dict.$SRC.txt exists.
# Writes:
#   OUT_DIR/spm/spm.model|.vocab, OUT_DIR/spm/{train,valid,test}.{$SRC,$TGT}  (pieces)
#   OUT_DIR/data-bin/                                   (fairseq-preprocess, joined dict)
#   OUT_DIR/raw/test.{$SRC,$TGT}                        (raw test text, for sacreBLEU)
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 RAW_DIR OUT_DIR [VOCAB]" >&2
  exit 2
fi
RAW_DIR="$1"
OUT_DIR="$2"
VOCAB="${3:-1000}"
SRC="${SRC:-de}"
TGT="${TGT:-en}"
SPM_TYPE="${SPM_TYPE:-bpe}"
WORKERS="${WORKERS:-2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v fairseq-preprocess >/dev/null 2>&1 && [ -x "$ROOT/.venv/bin/python" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
command -v fairseq-preprocess >/dev/null 2>&1 || {
  echo "ERROR: fairseq-preprocess not found (source scripts/setup_env.sh first)" >&2; exit 1; }

for split in train valid test; do
  for l in "$SRC" "$TGT"; do
    [ -s "$RAW_DIR/$split.$l" ] || { echo "ERROR: missing or empty $RAW_DIR/$split.$l" >&2; exit 1; }
  done
  n_src=$(wc -l < "$RAW_DIR/$split.$SRC")
  n_tgt=$(wc -l < "$RAW_DIR/$split.$TGT")
  if [ "$n_src" != "$n_tgt" ]; then
    echo "ERROR: $split has $n_src $SRC lines but $n_tgt $TGT lines" >&2; exit 1
  fi
done

if [ -f "$OUT_DIR/data-bin/dict.$SRC.txt" ] && [ "${FORCE:-0}" != 1 ]; then
  echo "[prepare_data] $OUT_DIR/data-bin already exists, skipping (FORCE=1 to rebuild)"
  exit 0
fi

mkdir -p "$OUT_DIR/spm" "$OUT_DIR/raw"
rm -rf "$OUT_DIR/data-bin"

echo "[prepare_data] training joint sentencepiece ($SPM_TYPE, vocab $VOCAB) on $RAW_DIR/train.{$SRC,$TGT}"
python - "$RAW_DIR" "$OUT_DIR/spm" "$VOCAB" "$SRC" "$TGT" "$SPM_TYPE" <<'PY'
import os
import sys

import sentencepiece as spm

raw, out, vocab, src, tgt, model_type = sys.argv[1:]
spm.SentencePieceTrainer.train(
    input=",".join(os.path.join(raw, f"train.{lang}") for lang in (src, tgt)),
    model_prefix=os.path.join(out, "spm"), vocab_size=int(vocab), model_type=model_type,
    character_coverage=1.0, hard_vocab_limit=False, input_sentence_size=2_000_000,
    shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000, num_threads=2,
    minloglevel=2)
sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spm.model"))
for split in ("train", "valid", "test"):
    for lang in (src, tgt):
        with open(os.path.join(raw, f"{split}.{lang}"), encoding="utf-8") as fin, \
                open(os.path.join(out, f"{split}.{lang}"), "w", encoding="utf-8") as fout:
            lines = [line.rstrip("\n") for line in fin]
            for pieces in sp.encode(lines, out_type=str):
                fout.write(" ".join(pieces) + "\n")
print(f"[prepare_data] sentencepiece vocab {sp.get_piece_size()}; encoded splits -> {out}")
PY

echo "[prepare_data] fairseq-preprocess -> $OUT_DIR/data-bin"
fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" \
  --trainpref "$OUT_DIR/spm/train" --validpref "$OUT_DIR/spm/valid" --testpref "$OUT_DIR/spm/test" \
  --destdir "$OUT_DIR/data-bin" --joined-dictionary --workers "$WORKERS" \
  > "$OUT_DIR/preprocess.log" 2>&1 || {
    echo "ERROR: fairseq-preprocess failed; log follows" >&2; tail -n 30 "$OUT_DIR/preprocess.log" >&2; exit 1; }

for l in "$SRC" "$TGT"; do
  # copy the raw test text unless RAW_DIR already is OUT_DIR/raw
  if [ ! "$RAW_DIR/test.$l" -ef "$OUT_DIR/raw/test.$l" ]; then
    cp "$RAW_DIR/test.$l" "$OUT_DIR/raw/test.$l"
  fi
done
echo "[prepare_data] done: $OUT_DIR/data-bin ($(wc -l < "$OUT_DIR/data-bin/dict.$SRC.txt") dict entries), refs in $OUT_DIR/raw/test.$TGT"
