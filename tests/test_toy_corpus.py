"""Fast checks of the toy corpus generator and the fairseq-generate scorer (no fairseq)."""

import filecmp
import os

import pytest

from dsq_fairseq.data.score import HypothesisCountError, read_hypotheses, score
from dsq_fairseq.data.toy_corpus import MAX_WORDS, MIN_WORDS, SPLITS, write_corpus

SIZES = dict(n_train=300, n_valid=40, n_test=50)


def _files(d):
    return [os.path.join(d, f"{s}.{lang}") for s in SPLITS for lang in ("de", "en")]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    a, b, c = (str(tmp_path_factory.mktemp(n)) for n in ("a", "b", "c"))
    write_corpus(a, seed=1, **SIZES)
    write_corpus(b, seed=1, **SIZES)
    write_corpus(c, seed=2, **SIZES)
    return a, b, c


def test_same_seed_identical_bytes(corpora):
    a, b, _ = corpora
    for fa, fb in zip(_files(a), _files(b)):
        assert filecmp.cmp(fa, fb, shallow=False), fa


def test_different_seed_differs(corpora):
    a, _, c = corpora
    for fa, fc in zip(_files(a), _files(c)):
        assert not filecmp.cmp(fa, fc, shallow=False), fa


def test_counts_lengths_and_format(corpora):
    a, _, _ = corpora
    expected = {"train": SIZES["n_train"], "valid": SIZES["n_valid"], "test": SIZES["n_test"]}
    sources = []
    for split in SPLITS:
        de = open(os.path.join(a, f"{split}.de"), encoding="utf-8").read().split("\n")
        en = open(os.path.join(a, f"{split}.en"), encoding="utf-8").read().split("\n")
        assert de[-1] == "" and en[-1] == ""  # trailing newline
        de, en = de[:-1], en[:-1]
        assert len(de) == len(en) == expected[split]
        for s, t in zip(de, en):
            for line in (s, t):
                assert MIN_WORDS <= len(line.split()) <= MAX_WORDS, line
                assert line.endswith(".") and line[0] == line[0].upper(), line
        sources += de
    assert len(set(sources)) == len(sources)  # no duplicates, no train/test overlap


def test_translation_is_a_function_of_the_source(tmp_path):
    # a larger corpus so that identical short sources would be likely if duplicates existed;
    # the same source word always maps consistently -> test a known function-word pattern
    info = write_corpus(str(tmp_path), n_train=2000, n_valid=0, n_test=0, seed=3)
    assert info["lines"]["train"] == 2000 and 300 <= info["lexicon_size"] <= 600
    de = open(tmp_path / "train.de", encoding="utf-8").read().splitlines()
    en = open(tmp_path / "train.en", encoding="utf-8").read().splitlines()
    for s, t in zip(de, en):
        assert (" nicht " in f" {s} ") == (" not " in f" {t} ")
        assert s.count(", und ") == t.count(", and ")


def _fake_generate_output(path, hyps, order):
    lines = ["2024-01-01 | INFO | fairseq_cli.generate | loading model(s)"]
    for i in order:
        lines += [f"S-{i}\tsource {i}", f"T-{i}\t{hyps[i]}", f"H-{i}\t-0.25\t{hyps[i]}",
                  f"D-{i}\t-0.25\t{hyps[i]}", f"P-{i}\t-0.1 -0.2 -0.3"]
    lines.append("Generate test with beam=5: BLEU = 100.00 100.0/100.0/100.0/100.0")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


REFS = ["The cat sleeps.", "A dog eats 23 big apples, and the bird sings.",
        "3 men do not walk in the park quickly.", "The house is red."]


def test_scorer_perfect_and_sorted(tmp_path):
    gen, ref = tmp_path / "gen.txt", tmp_path / "ref.en"
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    _fake_generate_output(gen, REFS, order=[2, 0, 3, 1])  # fairseq prints out of order
    assert read_hypotheses(str(gen)) == REFS
    r = score(str(gen), str(ref))
    assert r["n"] == 4 and r["bleu"] == pytest.approx(100.0)
    assert "nrefs:1" in r["signature"] and r["fairseq"].startswith("Generate test")
    assert score(str(gen))["bleu"] is None  # no reference: only fairseq's own line


def test_scorer_count_mismatch_raises(tmp_path):
    gen, ref = tmp_path / "gen.txt", tmp_path / "ref.en"
    ref.write_text("\n".join(REFS + ["one more reference."]) + "\n", encoding="utf-8")
    _fake_generate_output(gen, REFS, order=[0, 1, 2, 3])
    with pytest.raises(HypothesisCountError):
        score(str(gen), str(ref))
    _fake_generate_output(gen, REFS, order=[0, 1, 3])  # id 2 missing
    with pytest.raises(HypothesisCountError):
        read_hypotheses(str(gen))
