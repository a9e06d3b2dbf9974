"""Extract and clean the paper's corpora into raw ``{train,valid,test}.{src,tgt}`` text.

    python -m dsq_fairseq.tools.prepare_corpus iwslt17 SOURCE_DIR OUT_DIR
    python -m dsq_fairseq.tools.prepare_corpus wmt14 SOURCE_DIR OUT_DIR

``SOURCE_DIR`` holds the downloaded archives *already unpacked* (``scripts/*/prepare.sh`` downloads
and unpacks them, or takes an offline copy). The output is detokenised text, one sentence per
line, ready for ``scripts/prepare_data.sh`` (sentencepiece + ``fairseq-preprocess``).

IWSLT17 DE-EN (TED talks, the ``2017-01-trnted`` release): train = ``train.tags.de-en.*`` without
its XML-like meta lines; valid = ``IWSLT17.TED.dev2010``; test = ``IWSLT17.TED.tst2015`` (override
with ``--test-sets``). WMT14 EN-DE (as fairseq's ``prepare-wmt14en2de.sh``): train = Europarl v7 +
Common Crawl + News Commentary v12; valid = newstest2013; test = newstest2014 (full). Training
pairs are cleaned: empty sides dropped, at most ``--max-words`` words a side, length ratio at most
``--max-ratio``; duplicates are kept (as the paper's pipeline does).
"""

import argparse
import html
import json
import re
import sys
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

_SEG = re.compile(r"<seg[^>]*>(.*)</seg>", re.IGNORECASE)


def read_plain(path: Path) -> List[str]:
    """Lines of a plain-text side, skipping IWSLT's ``<url>``/``<talkid>``-style meta lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if not ln.lstrip().startswith("<")]


def read_segments(path: Path) -> List[str]:
    """The ``<seg>`` contents of an IWSLT ``.xml`` or WMT ``.sgm`` file, entities unescaped."""
    text = path.read_text(encoding="utf-8")
    return [html.unescape(m.group(1)).strip() for m in _SEG.finditer(text)]


def clean_pairs(pairs: Sequence[Tuple[str, str]], max_words: int, max_ratio: float
                ) -> Iterator[Tuple[str, str]]:
    """Drop pairs with an empty side, a side over ``max_words`` words or a length ratio over
    ``max_ratio`` (in words)."""
    for src, tgt in pairs:
        ns, nt = len(src.split()), len(tgt.split())
        if ns == 0 or nt == 0 or ns > max_words or nt > max_words:
            continue
        if max(ns, nt) / min(ns, nt) > max_ratio:
            continue
        yield src, tgt


def _find(root: Path, pattern: str) -> Path:
    hits = sorted(root.rglob(pattern))
    if not hits:
        raise FileNotFoundError(f"no file matching '{pattern}' under {root}")
    return hits[0]


def _write(out_dir: Path, split: str, src_lang: str, tgt_lang: str,
           pairs: Sequence[Tuple[str, str]]) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, lang in enumerate((src_lang, tgt_lang)):
        (out_dir / f"{split}.{lang}").write_text("".join(p[i] + "\n" for p in pairs),
                                                 encoding="utf-8")
    return len(pairs)


def iwslt17(src_dir: Path, test_sets: List[str], src: str = "de", tgt: str = "en"
            ) -> dict:
    pair = f"{src}-{tgt}" if (next(src_dir.rglob(f"train.tags.{src}-{tgt}.{src}"), None)) \
        else f"{tgt}-{src}"
    train = list(zip(read_plain(_find(src_dir, f"train.tags.{pair}.{src}")),
                     read_plain(_find(src_dir, f"train.tags.{pair}.{tgt}"))))

    def xml_split(name: str) -> List[Tuple[str, str]]:
        return list(zip(read_segments(_find(src_dir, f"IWSLT17.TED.{name}.{pair}.{src}.xml")),
                        read_segments(_find(src_dir, f"IWSLT17.TED.{name}.{pair}.{tgt}.xml"))))

    test: List[Tuple[str, str]] = []
    for name in test_sets:
        test += xml_split(name)
    return {"train": train, "valid": xml_split("dev2010"), "test": test}


def wmt14(src_dir: Path, src: str = "en", tgt: str = "de") -> dict:
    train: List[Tuple[str, str]] = []
    for stem in ("europarl-v7.de-en", "commoncrawl.de-en", "news-commentary-v12.de-en"):
        s = _find(src_dir, f"{stem}.{src}").read_text(encoding="utf-8").splitlines()
        t = _find(src_dir, f"{stem}.{tgt}").read_text(encoding="utf-8").splitlines()
        if len(s) != len(t):
            raise ValueError(f"{stem}: {len(s)} {src} lines but {len(t)} {tgt} lines")
        train += zip((x.strip() for x in s), (x.strip() for x in t))
    valid = list(zip(read_segments(_find(src_dir, f"newstest2013-src.{src}.sgm")),
                     read_segments(_find(src_dir, f"newstest2013-ref.{tgt}.sgm"))))
    test = list(zip(read_segments(_find(src_dir, f"newstest2014-deen-src.{src}.sgm")),
                    read_segments(_find(src_dir, f"newstest2014-deen-ref.{tgt}.sgm"))))
    return {"train": train, "valid": valid, "test": test}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["iwslt17", "wmt14"])
    parser.add_argument("source_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--test-sets", default="tst2015",
                        help="IWSLT17 test sets, comma-separated (default tst2015)")
    parser.add_argument("--max-words", type=int, default=250)
    parser.add_argument("--max-ratio", type=float, default=1.5)
    args = parser.parse_args(argv)
    if args.dataset == "iwslt17":
        src, tgt = "de", "en"
        splits = iwslt17(args.source_dir, args.test_sets.split(","), src, tgt)
    else:
        src, tgt = "en", "de"
        splits = wmt14(args.source_dir, src, tgt)
    splits["train"] = list(clean_pairs(splits["train"], args.max_words, args.max_ratio))
    counts = {split: _write(args.out_dir, split, src, tgt, pairs)
              for split, pairs in splits.items()}
    print(json.dumps({"dataset": args.dataset, "out_dir": str(args.out_dir), "lines": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
