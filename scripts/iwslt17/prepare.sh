#!/usr/bin/env bash
# IWSLT17 DE-EN: download (or take an offline copy), clean, joint sentencepiece, fairseq-preprocess.
#
# Usage: bash scripts/iwslt17/prepare.sh [--from PATH] [OUT_DIR]
#   --from PATH  an already-downloaded de-en.zip / de-en.tgz, or a directory holding the
#                unpacked files (train.tags.de-en.*, IWSLT17.TED.*.xml) -- for offline machines
#   OUT_DIR      default data/iwslt17; gets raw/ (cleaned text), spm/ and data-bin/
# Env: VOCAB=10000 (joint sentencepiece vocabulary), TEST_SETS=tst2015 (comma-separated),
#      URL (the release archive; default below).
# Source: the IWSLT 2017 evaluation campaign's "2017-01-trnted" TED release, DE-EN pair
#         (~206k training pairs, dev2010 888 pairs, tst2015 1080 pairs; archive ~20 MB).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
URL="${URL:-https://huggingface.co/datasets/IWSLT/iwslt2017/resolve/main/data/2017-01-trnted/texts/de/en/de-en.zip}"
FROM=""
if [ "${1:-}" = "--from" ]; then FROM="$(realpath "$2")"; shift 2; fi
OUT_DIR="$(realpath -m "${1:-$ROOT/data/iwslt17}")"
mkdir -p "$OUT_DIR/orig"
command -v fairseq-preprocess >/dev/null 2>&1 || source "$ROOT/scripts/setup_env.sh"

if [ -z "$FROM" ]; then
  FROM="$OUT_DIR/orig/$(basename "$URL")"
  [ -s "$FROM" ] || { echo "downloading $URL"; curl -fL --retry 3 -o "$FROM" "$URL"; }
fi
if [ -d "$FROM" ]; then
  SRC_DIR="$FROM"
else
  SRC_DIR="$OUT_DIR/orig/unpacked"
  mkdir -p "$SRC_DIR"
  case "$FROM" in
    *.zip) python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$FROM" "$SRC_DIR" ;;
    *.tgz|*.tar.gz) tar -xzf "$FROM" -C "$SRC_DIR" ;;
    *) echo "error: --from must be a .zip, .tgz or a directory" >&2; exit 2 ;;
  esac
  # the release nests one more archive per pair in some mirrors
  find "$SRC_DIR" -name 'de-en.tgz' -exec tar -xzf {} -C "$SRC_DIR" \;
fi
python -m dsq_fairseq.tools.prepare_corpus iwslt17 "$SRC_DIR" "$OUT_DIR/clean" \
  --test-sets "${TEST_SETS:-tst2015}"
SRC=de TGT=en bash "$ROOT/scripts/prepare_data.sh" "$OUT_DIR/clean" "$OUT_DIR" "${VOCAB:-10000}"
echo "data-bin: $OUT_DIR/data-bin   raw test reference: $OUT_DIR/raw/test.en"
