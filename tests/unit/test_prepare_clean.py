"""Cleaning components: text normalisation and the MinHash near-duplicate index."""

from __future__ import annotations

import numpy as np

from finetune.data.clean import NearIndex, clean_example, normalize_text, shingle_hashes
from finetune.data.formats import to_example


def test_normalize_keeps_indentation_and_newlines():
    text = "  def f():\r\n      return  1\u00a0 \n\n\n\nend\x07  "
    assert normalize_text(text) == "def f():\n      return 1\n\nend"
    assert normalize_text("ﬁ ①") == "fi 1"  # NFKC


def test_signatures_equal_datasketch_minhash_of_the_same_shingles():
    from datasketch import MinHash

    texts = ["The quick brown fox jumps over the lazy dog", "two words", "", "same same same same same"]
    index = NearIndex(0.8)
    sigs = index.signatures(texts)
    grams, counts = shingle_hashes(texts)
    assert counts == [7, 1, 1, 3]
    start = 0
    for text, sig, count in zip(texts, sigs, counts, strict=True):
        reference = MinHash(num_perm=64, seed=1, hashfunc=int)  # the gram hashes are already ints
        reference.update_batch([int(g) for g in grams[start: start + count]])
        start += count
        assert np.array_equal(reference.hashvalues, sig.hashvalues), text


def test_near_index_finds_retyped_rows_but_not_different_ones():
    base = "my desk lamp order 48213 arrived broken please help thanks dana"
    index = NearIndex(0.85)
    a, same_words, other = index.signatures(
        [base, base.upper().replace(" ", ",  "), "the river runs quietly past the old mill towards the sea at dusk"])
    index.add("a", a)
    hit = index.query(same_words)
    assert hit is not None and hit[0] == "a" and hit[1] == 1.0
    assert index.query(other) is None
    # shingles never run across two texts: the same words split differently give different grams
    one, _ = shingle_hashes(["a b c d"])
    two, _ = shingle_hashes(["a b", "c d"])
    assert set(one.tolist()).isdisjoint(two.tolist())


def test_clean_example_reports_the_role_names_that_were_mapped():
    rec = {"messages": [{"role": "Human", "content": "Hi  there"}, {"role": "gpt", "content": "Hello"}]}
    example, changes = clean_example(to_example(rec, "messages", {}), unicode=True, whitespace=True,
                                     require_assistant_last=True, system_prompt=None)
    assert example == {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]}
    assert changes == {"normalized": True, "system_prompt_added": False,
                       "roles_mapped": {"Human->user": 1, "gpt->assistant": 1}}
    _, plain = clean_example(to_example({"messages": [{"role": "user", "content": "a b c d"},
                                                      {"role": "assistant", "content": "e"}]}, "messages", {}),
                             unicode=True, whitespace=True, require_assistant_last=True, system_prompt=None)
    assert plain["roles_mapped"] == {}
