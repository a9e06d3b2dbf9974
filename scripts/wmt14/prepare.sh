#!/usr/bin/env bash
# WMT14 EN-DE: download (or take offline copies), clean, joint sentencepiece, fairseq-preprocess.
#
# Usage: bash scripts/wmt14/prepare.sh [--from DIR] [OUT_DIR]
#   --from DIR  a directory with the archives below already downloaded (or already unpacked)
#   OUT_DIR     default data/wmt14; gets raw/ (cleaned text), spm/ and data-bin/
# Env: VOCAB=32000 (joint sentencepiece vocabulary).
# Sources (as fairseq's examples/translation/prepare-wmt14en2de.sh): Europarl v7, Common Crawl,
# News Commentary v12 (training, ~4.5M pairs; archives ~1.5 GB), newstest2013 (valid, 3000),
# newstest2014 full (test, 3003).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
URLS=(
  "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz"
  "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz"
  "http://data.statmt.org/wmt17/translation-task/training-parallel-nc-v12.tgz"
  "http://data.statmt.org/wmt17/translation-task/dev.tgz"
  "http://statmt.org/wmt14/test-full.tgz"
)
FROM=""
if [ "${1:-}" = "--from" ]; then FROM="$(realpath "$2")"; shift 2; fi
OUT_DIR="$(realpath -m "${1:-$ROOT/data/wmt14}")"
ORIG="${FROM:-$OUT_DIR/orig}"
mkdir -p "$ORIG" "$OUT_DIR/unpacked"
command -v fairseq-preprocess >/dev/null 2>&1 || source "$ROOT/scripts/setup_env.sh"

for url in "${URLS[@]}"; do
  file="$ORIG/$(basename "$url")"
  if [ ! -s "$file" ] && [ -z "$FROM" ]; then
    echo "downloading $url"; curl -fL --retry 3 -o "$file" "$url"
  fi
  [ ! -s "$file" ] || tar -xzf "$file" -C "$OUT_DIR/unpacked"
done
SRC_DIR="$OUT_DIR/unpacked"
# --from a directory of already unpacked files (no archives in it): read it directly
if [ -n "$FROM" ] && ! ls "$FROM"/*.tgz >/dev/null 2>&1; then SRC_DIR="$FROM"; fi
python -m dsq_fairseq.tools.prepare_corpus wmt14 "$SRC_DIR" "$OUT_DIR/clean"
SRC=en TGT=de bash "$ROOT/scripts/prepare_data.sh" "$OUT_DIR/clean" "$OUT_DIR" "${VOCAB:-32000}"
echo "data-bin: $OUT_DIR/data-bin   raw test reference: $OUT_DIR/raw/test.de"
