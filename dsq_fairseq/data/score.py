"""Score a ``fairseq-generate`` output file with sacreBLEU against raw references.

Usage::

    python -m dsq_fairseq.data.score GEN_OUT [REF] [--json OUT.json]

* Hypotheses are the ``D-<id>`` lines (detokenised) of ``GEN_OUT`` -- or the ``H-<id>`` lines
  when the file has no ``D-`` lines -- sorted by sentence id.  With ``--remove-bpe
  sentencepiece`` and no ``--tokenizer`` the two are identical.
* The hypothesis ids must be exactly ``0..N-1`` and ``N`` must equal the number of reference
  lines (``REF``) -- otherwise :class:`HypothesisCountError` is raised (exit status 2 from the
  CLI).  Without ``REF`` the ``T-`` lines of the file set ``N`` and only fairseq's own
  ``Generate ... BLEU`` line is reported.
* The score is sacreBLEU's default corpus BLEU (13a tokenisation, mixed case), with signature.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Dict, List, Optional

_LINE = re.compile(r"^([HDT])-(\d+)\t(.*)$")


class HypothesisCountError(ValueError):
    """Raised when the hypotheses do not line up 1:1 with the references."""


def _read_tagged(path: str) -> Dict[str, Dict[int, str]]:
    out: Dict[str, Dict[int, str]] = {"H": {}, "D": {}, "T": {}}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            m = _LINE.match(raw.rstrip("\n"))
            if not m:
                continue
            tag, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            if tag in "HD":  # H-<id>\t<score>\t<text>; only the first (best) hypothesis counts
                parts = rest.split("\t", 1)
                text = parts[1] if len(parts) == 2 else ""
            else:  # T-<id>\t<text>
                text = rest
            out[tag].setdefault(idx, text)
    return out


def read_hypotheses(gen_out: str) -> List[str]:
    """Best hypotheses of a fairseq-generate output, ordered by sentence id.

    Raises :class:`HypothesisCountError` if the ids are not exactly ``0..N-1``.
    """
    tagged = _read_tagged(gen_out)
    hyps = tagged["D"] if tagged["D"] else tagged["H"]
    ids = sorted(hyps)
    if ids != list(range(len(ids))):
        missing = sorted(set(range(max(ids) + 1 if ids else 0)) - set(ids))
        raise HypothesisCountError(
            f"{gen_out}: hypothesis ids are not 0..{len(ids) - 1} "
            f"(missing e.g. {missing[:10]})")
    return [hyps[i] for i in ids]


def read_fairseq_bleu(gen_out: str) -> Optional[str]:
    """fairseq's own final ``Generate <subset> with beam=...: BLEU...`` line, if any."""
    found = None
    with open(gen_out, encoding="utf-8") as f:
        for line in f:
            if "Generate " in line and "BLEU" in line:
                found = line.strip()
    if found is None:
        return None
    i = found.find("Generate ")
    return found[i:]


def score(gen_out: str, ref: Optional[str] = None) -> dict:
    """Check the hypothesis count and compute sacreBLEU.

    Returns ``{"n", "bleu", "signature", "score_str", "fairseq"}`` (``bleu``/``signature`` are
    ``None`` when ``ref`` is not given).
    """
    hyps = read_hypotheses(gen_out)
    result = {"n": len(hyps), "bleu": None, "signature": None, "score_str": None,
              "fairseq": read_fairseq_bleu(gen_out)}
    if ref is None:
        n_t = len(_read_tagged(gen_out)["T"])
        if n_t and n_t != len(hyps):
            raise HypothesisCountError(
                f"{gen_out}: {len(hyps)} hypotheses but {n_t} target (T-) lines")
        return result
    with open(ref, encoding="utf-8") as f:
        refs = [line.rstrip("\n") for line in f]
    if len(hyps) != len(refs):
        raise HypothesisCountError(
            f"{len(hyps)} hypotheses in {gen_out} but {len(refs)} references in {ref}")
    if not hyps:
        raise HypothesisCountError(f"no hypotheses found in {gen_out}")
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    s = bleu.corpus_score(hyps, [refs])
    result.update(bleu=round(s.score, 2), signature=str(bleu.get_signature()),
                  score_str=str(s))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="sacreBLEU for a fairseq-generate output file")
    p.add_argument("gen_out", help="file with fairseq-generate stdout")
    p.add_argument("ref", nargs="?", default=None, help="raw (detokenised) reference file")
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    a = p.parse_args(argv)
    try:
        r = score(a.gen_out, a.ref)
    except HypothesisCountError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(f"hypotheses: {r['n']}")
    if r["bleu"] is not None:
        print(f"sacreBLEU: {r['score_str']}")
        print(f"signature: {r['signature']}")
    if r["fairseq"]:
        print(f"fairseq:   {r['fairseq']}")
    if r["bleu"] is None and not r["fairseq"]:
        print("WARNING: no reference given and no fairseq BLEU line found", file=sys.stderr)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
