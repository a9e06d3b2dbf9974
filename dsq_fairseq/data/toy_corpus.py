"""Deterministic, download-free synthetic "de" -> "en" parallel corpus for the demo.

The corpus is a small but real sequence-to-sequence task: a transformer has to learn a
word dictionary, morphology, agreement and several systematic reorderings.  A 2-layer,
128-dim transformer reaches a clearly non-trivial (but not perfect) BLEU after a few CPU
minutes on 20k sentence pairs.

Lexicon
-------
Built once from the fixed seed ``LEXICON_SEED`` (independent of the ``seed`` argument, so every
corpus seed samples the *same* language).  Pseudo-words are made of syllables with German-like
spelling on the source side and English-like spelling on the target side; source and target
strings are unrelated, so the dictionary must be learned.  Per category (source -> target):

* 160 nouns in three genders (article ``der``/``die``/``das`` -> ``the``; ``ein``/``eine`` ->
  ``a``); 16 of them map to a *two-word* target compound (``Xa`` -> ``y z``).
* 80 adjectives, 80 transitive verbs (10 map to a phrasal verb ``v up``-style, i.e. two target
  words), 40 intransitive verbs, 24 adverbs, 16 prepositions.
* Numbers 2..99 as German number words (``drei``, ``dreizehn``, ``drei und zwanzig`` -- unit
  before tens, three source tokens) -> target digits (``3``, ``13``, ``23``).
* Function words: ``und`` -> ``and``, ``nicht`` -> ``does not`` / ``do not``.

Inflection (regular, learnable from sub-words): plural nouns ``stem+en`` -> ``stem+s``; verbs
agree with the subject: singular ``stem+t`` -> ``stem+s``, plural ``stem+en`` -> ``stem``; under
negation the target verb is the bare stem after ``does not``/``do not``.

Grammar
-------
::

    S      -> CLAUSE | CLAUSE , und CLAUSE                  (en: CLAUSE , and CLAUSE)
    CLAUSE -> NP [ADV] [PP] NP [nicht] VT                   (source: verb-final, SOV)
            | NP [ADV] [PP] [nicht] VI
      en   -> NP [does/do not] VT NP [PP] [ADV]             (target: SVO, PP and ADV last)
            | NP [does/do not] VI [PP] [ADV]
    NP     -> DET N [ADJ1 [ADJ2]] | NUM Npl [ADJ1]          (source: adjectives after noun)
      en   -> DET [ADJ2] [ADJ1] N | NUM [ADJ1] Npl          (target: before noun, mirrored)
    PP     -> PREP NP

Word choice is Zipf-like (weight ``1/(rank+5)``) so that some words are rare and BLEU stays
below 100.  Source nouns are capitalised (German style); in both languages the first word is
capitalised and the sentence ends with a period attached to the last word, and the clause
comma is attached to the preceding word, so detokenisation matters.

Guarantees
----------
* Stdlib only (``random.Random``); the same arguments give byte-identical files (UTF-8, ``\\n``
  line endings, one sentence per line) on any platform and Python >= 3.8.
* ``DIR/{train,valid,test}.{de,en}`` with exactly ``n_train/n_valid/n_test`` lines; line *i* of
  the ``.de`` file translates to line *i* of the ``.en`` file.
* Every sentence has between ``MIN_WORDS`` and ``MAX_WORDS`` (4..20) whitespace-separated
  words on *both* sides.
* No source sentence occurs twice in the whole corpus (so valid/test never overlap train).
* The translation is a deterministic function of the source sentence.

CLI::

    python -m dsq_fairseq.data.toy_corpus --out DIR [--train 20000 --valid 500 --test 500 --seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
from typing import Dict, List, Sequence, Tuple

LEXICON_SEED = 20240521
MIN_WORDS = 4
MAX_WORDS = 20
SPLITS = ("train", "valid", "test")

N_NOUNS, N_COMPOUND_NOUNS = 160, 16
N_ADJ = 80
N_VT, N_PHRASAL_VT = 80, 10
N_VI = 40
N_ADV = 24
N_PREP = 16

_SRC_ON = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "w", "z",
           "sch", "st", "kr", "br", "gr", "pf", "fl", "tr", "kl"]
_SRC_NUC = ["a", "e", "i", "o", "u", "ä", "ö", "ü", "ei", "au", "ie"]
_SRC_CODA = ["", "", "", "n", "r", "l", "s", "ch"]
_SRC_CODA_FINAL = ["n", "r", "l", "ch", "t", "m", "ng", "rk", "lf", "g", "b", "d"]

_TGT_ON = ["b", "c", "d", "f", "g", "h", "j", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "th", "sh", "ch", "bl", "cr", "gl", "pr", "sl", "tr", "qu"]
_TGT_NUC = ["a", "e", "i", "o", "u", "ea", "oo", "ai", "ou", "y"]
_TGT_CODA = ["", "", "", "n", "t", "ll", "p", "m"]
_TGT_CODA_FINAL = ["n", "t", "ck", "ll", "nd", "p", "m", "rt", "lk", "ng", "ff", "b"]
_PARTICLES = ["up", "out", "off", "down", "away", "over", "back", "in", "on", "about"]

_DE_ONES = ["", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"]
_DE_TEENS = ["zehn", "elf", "zwölf", "dreizehn", "vierzehn", "fünfzehn", "sechzehn",
             "siebzehn", "achtzehn", "neunzehn"]
_DE_TENS = ["", "", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig",
            "achtzig", "neunzig"]

_GENDER_DEF = ("der", "die", "das")
_GENDER_INDEF = ("ein", "eine", "ein")


def _de_number(n: int) -> List[str]:
    """German number words for 2 <= n <= 99 (units before tens: 23 -> drei und zwanzig)."""
    if n < 10:
        return [_DE_ONES[n]]
    if n < 20:
        return [_DE_TEENS[n - 10]]
    tens, ones = divmod(n, 10)
    if ones == 0:
        return [_DE_TENS[tens]]
    return ["ein" if ones == 1 else _DE_ONES[ones], "und", _DE_TENS[tens]]


def _en_plural(stem: str) -> str:
    return stem + ("es" if stem.endswith(("s", "sh", "ch", "x")) else "s")


class Lexicon:
    """The fixed source/target dictionary (built from ``LEXICON_SEED`` only)."""

    def __init__(self, seed: int = LEXICON_SEED) -> None:
        rng = random.Random(seed)
        self._used_src: set = set(_DE_ONES + _DE_TEENS + _DE_TENS)
        self._used_src.update(["und", "nicht", "der", "die", "das", "ein", "eine", ""])
        self._used_tgt: set = {"the", "a", "and", "does", "do", "not", ""}
        self._used_tgt.update(_PARTICLES)

        # nouns: (src_stem, gender, tgt_words); compounds have two target words
        self.nouns: List[Tuple[str, int, Tuple[str, ...]]] = []
        for i in range(N_NOUNS):
            src = self._new_src(rng, ["en"], final_consonant=True)
            if i % (N_NOUNS // N_COMPOUND_NOUNS) == 3:
                tgt: Tuple[str, ...] = (self._new_tgt(rng, ["s", "es"]),
                                        self._new_tgt(rng, ["s", "es"]))
            else:
                tgt = (self._new_tgt(rng, ["s", "es"]),)
            self.nouns.append((src, rng.randrange(3), tgt))
        self.adjs = [(self._new_src(rng, []), self._new_tgt(rng, [])) for _ in range(N_ADJ)]
        self.vts: List[Tuple[str, Tuple[str, ...]]] = []
        for i in range(N_VT):
            src = self._new_src(rng, ["t", "en"], final_consonant=True)
            verb = self._new_tgt(rng, ["s", "es"])
            if i % (N_VT // N_PHRASAL_VT) == 5:
                self.vts.append((src, (verb, _PARTICLES[len(self.vts) % len(_PARTICLES)])))
            else:
                self.vts.append((src, (verb,)))
        self.vis = [(self._new_src(rng, ["t", "en"], final_consonant=True),
                     (self._new_tgt(rng, ["s", "es"]),)) for _ in range(N_VI)]
        self.advs = [(self._new_src(rng, []), self._new_tgt(rng, [], suffix="ly"))
                     for _ in range(N_ADV)]
        self.preps = [(self._new_src(rng, [], max_syl=1), self._new_tgt(rng, [], max_syl=1))
                      for _ in range(N_PREP)]

    # -- word generation --------------------------------------------------------------------
    def _new_src(self, rng: random.Random, suffixes: Sequence[str], final_consonant=False,
                 max_syl: int = 3) -> str:
        return self._new_word(rng, self._used_src, _SRC_ON, _SRC_NUC, _SRC_CODA,
                              _SRC_CODA_FINAL if final_consonant else _SRC_CODA,
                              suffixes, "", max_syl)

    def _new_tgt(self, rng: random.Random, suffixes: Sequence[str], suffix: str = "",
                 max_syl: int = 3) -> str:
        return self._new_word(rng, self._used_tgt, _TGT_ON, _TGT_NUC, _TGT_CODA,
                              _TGT_CODA_FINAL, suffixes, suffix, max_syl)

    @staticmethod
    def _new_word(rng, used, onsets, nuclei, codas, final_codas, suffixes, suffix, max_syl):
        while True:
            n_syl = rng.choice([k for k in (1, 1, 1, 2, 2, 2, 2, 3) if k <= max_syl])
            parts = []
            for k in range(n_syl):
                coda = rng.choice(final_codas if k == n_syl - 1 else codas)
                parts.append(rng.choice(onsets) + rng.choice(nuclei) + coda)
            word = "".join(parts) + suffix
            forms = [word] + [word + s for s in suffixes]
            if not any(f in used for f in forms) and len(word) >= 3:
                used.update(forms)
                return word

    # -- inflection ---------------------------------------------------------------------------
    @staticmethod
    def noun_src(stem: str, plural: bool) -> str:
        return (stem + "en" if plural else stem).capitalize()

    @staticmethod
    def noun_tgt(words: Tuple[str, ...], plural: bool) -> List[str]:
        return list(words[:-1]) + [_en_plural(words[-1]) if plural else words[-1]]

    @staticmethod
    def verb_src(stem: str, plural: bool) -> str:
        return stem + ("en" if plural else "t")

    @staticmethod
    def verb_tgt(words: Tuple[str, ...], plural: bool, negated: bool) -> List[str]:
        head = words[0] if (plural or negated) else _en_plural(words[0])
        aux = (["do" if plural else "does", "not"]) if negated else []
        return aux + [head] + list(words[1:])

    def size(self) -> int:
        """Number of distinct source lexical entries (stems, function and number words)."""
        n_num = len(set(w for n in range(2, 100) for w in _de_number(n)))
        return (len(self.nouns) + len(self.adjs) + len(self.vts) + len(self.vis)
                + len(self.advs) + len(self.preps) + n_num + len(_GENDER_DEF) + 2 + 1)


def _zipf_weights(n: int) -> List[float]:
    return [1.0 / (r + 5) for r in range(n)]


class _Sampler:
    def __init__(self, lex: Lexicon, rng: random.Random) -> None:
        self.lex = lex
        self.rng = rng
        self._w: Dict[int, List[float]] = {}

    def pick(self, items: Sequence):
        n = len(items)
        if n not in self._w:
            self._w[n] = _zipf_weights(n)
        return self.rng.choices(items, weights=self._w[n])[0]

    def np(self) -> Tuple[List[str], List[str], bool]:
        """Returns (src_words, tgt_words, plural)."""
        rng = self.rng
        stem, gender, tgt = self.pick(self.lex.nouns)
        if rng.random() < 0.2:  # number + plural noun
            n = rng.randint(2, 99)
            n_adj = 1 if rng.random() < 0.4 else 0
            adjs = [self.pick(self.lex.adjs) for _ in range(n_adj)]
            src = _de_number(n) + [Lexicon.noun_src(stem, True)] + [a[0] for a in adjs]
            out = [str(n)] + [a[1] for a in adjs] + Lexicon.noun_tgt(tgt, True)
            return src, out, True
        definite = rng.random() < 0.7
        det_src = (_GENDER_DEF if definite else _GENDER_INDEF)[gender]
        det_tgt = "the" if definite else "a"  # target words never start with a vowel
        r = rng.random()
        n_adj = 0 if r < 0.45 else (1 if r < 0.85 else 2)
        adjs = [self.pick(self.lex.adjs) for _ in range(n_adj)]
        src = [det_src, Lexicon.noun_src(stem, False)] + [a[0] for a in adjs]
        out = [det_tgt] + [a[1] for a in reversed(adjs)] + Lexicon.noun_tgt(tgt, False)
        return src, out, False

    def clause(self) -> Tuple[List[str], List[str]]:
        rng = self.rng
        subj_s, subj_t, plural = self.np()
        adv = self.pick(self.lex.advs) if rng.random() < 0.3 else None
        pp = None
        if rng.random() < 0.35:
            prep = self.pick(self.lex.preps)
            pn_s, pn_t, _ = self.np()
            pp = ([prep[0]] + pn_s, [prep[1]] + pn_t)
        negated = rng.random() < 0.2
        transitive = rng.random() < 0.7
        src = list(subj_s) + ([adv[0]] if adv else []) + (pp[0] if pp else [])
        tgt = list(subj_t)
        if transitive:
            v_stem, v_tgt = self.pick(self.lex.vts)
            obj_s, obj_t, _ = self.np()
            src += obj_s
            tgt += Lexicon.verb_tgt(v_tgt, plural, negated) + obj_t
        else:
            v_stem, v_tgt = self.pick(self.lex.vis)
            tgt += Lexicon.verb_tgt(v_tgt, plural, negated)
        src += (["nicht"] if negated else []) + [Lexicon.verb_src(v_stem, plural)]
        tgt += (pp[1] if pp else []) + ([adv[1]] if adv else [])
        return src, tgt

    def sentence(self) -> Tuple[List[str], List[str]]:
        src, tgt = self.clause()
        if self.rng.random() < 0.3:
            s2, t2 = self.clause()
            src = src[:-1] + [src[-1] + ",", "und"] + s2
            tgt = tgt[:-1] + [tgt[-1] + ",", "and"] + t2
        return src, tgt


def _finish(words: List[str]) -> str:
    words = list(words)
    words[0] = words[0][:1].upper() + words[0][1:]
    words[-1] += "."
    return " ".join(words)


def generate_pairs(n: int, seed: int, seen: set = None) -> List[Tuple[str, str]]:
    """``n`` (source, target) sentence pairs; source sentences in ``seen`` are skipped."""
    seen = set() if seen is None else seen
    sampler = _Sampler(Lexicon(), random.Random(seed))
    pairs: List[Tuple[str, str]] = []
    while len(pairs) < n:
        src, tgt = sampler.sentence()
        if not (MIN_WORDS <= len(src) <= MAX_WORDS and MIN_WORDS <= len(tgt) <= MAX_WORDS):
            continue
        s, t = _finish(src), _finish(tgt)
        if s in seen:
            continue
        seen.add(s)
        pairs.append((s, t))
    return pairs


def write_corpus(out_dir: str, n_train: int = 20000, n_valid: int = 500, n_test: int = 500,
                 seed: int = 1, src: str = "de", tgt: str = "en") -> dict:
    """Write ``out_dir/{train,valid,test}.{src,tgt}`` and return a small description dict.

    Returns ``{"out_dir", "seed", "lines": {split: n}, "files": [paths], "lexicon_size"}``.
    """
    if min(n_train, n_valid, n_test) < 0:
        raise ValueError("split sizes must be >= 0")
    os.makedirs(out_dir, exist_ok=True)
    counts = {"train": n_train, "valid": n_valid, "test": n_test}
    # one RNG stream for the whole corpus; test/valid first so their content does not depend
    # on n_train, then train excludes every held-out source sentence.
    pairs = generate_pairs(n_test + n_valid + n_train, seed)
    chunks = {"test": pairs[:n_test], "valid": pairs[n_test:n_test + n_valid],
              "train": pairs[n_test + n_valid:]}
    files = []
    for split in SPLITS:
        for side, lang in ((0, src), (1, tgt)):
            path = os.path.join(out_dir, f"{split}.{lang}")
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                for pair in chunks[split]:
                    f.write(pair[side] + "\n")
            files.append(path)
    return {"out_dir": out_dir, "seed": seed, "lines": counts, "files": files,
            "lexicon_size": Lexicon().size()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--valid", type=int, default=500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--src", default="de", help="source file suffix (default: de)")
    p.add_argument("--tgt", default="en", help="target file suffix (default: en)")
    a = p.parse_args(argv)
    info = write_corpus(a.out, a.train, a.valid, a.test, a.seed, a.src, a.tgt)
    print(f"toy corpus (seed {a.seed}, {info['lexicon_size']} source lexical entries) -> "
          f"{a.out}: " + ", ".join(f"{k}={v}" for k, v in info["lines"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
