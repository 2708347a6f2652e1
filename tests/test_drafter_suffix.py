"""SuffixDecoding: the suffix trie counts every substring exactly (checked against brute force),
drafts follow the most frequent continuations within the budget, the global trie remembers
earlier outputs within its cap, and the engine stays exactly AR with it."""
from __future__ import annotations

import gc
import json
import random
import re
from collections import Counter

import pytest

from fastdecode import SamplingParams
from fastdecode.drafters.suffix import SEPARATOR, SuffixDrafter, SuffixTrie, load_datastore
from fastdecode.tree import DraftTree


def continuation_counts(documents: list[list[int]], max_depth: int) -> Counter:
    """Brute force: (substring, next token) -> how often that token followed that substring."""
    counts: Counter = Counter()
    for doc in documents:
        for start in range(len(doc)):
            for end in range(start, min(start + max_depth, len(doc))):
                counts[tuple(doc[start:end]), doc[end]] += 1
    return counts


@pytest.mark.parametrize("seed", range(20))
def test_trie_counts_equal_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    max_depth = rng.randint(2, 6)
    documents = [[rng.randint(0, 3) for _ in range(rng.randint(1, 40))] for _ in range(rng.randint(1, 3))]
    trie = SuffixTrie(max_depth)
    for doc in documents:
        trie.extend(doc)
        trie.close_document()
    counts = continuation_counts(documents, max_depth)
    totals: Counter = Counter()
    for (substring, _), n in counts.items():
        totals[substring] += n
    for (substring, token), n in counts.items():
        cursor = trie.find(list(substring))
        assert trie.has_continuation(cursor, len(substring))
        estimates = {t: p for t, _, p in trie.continuations(cursor)}
        assert estimates[token] == pytest.approx(n / totals[substring]), (substring, token)


def test_repeated_phrase_is_continued() -> None:
    drafter = SuffixDrafter(min_score=0.0)
    context = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]
    drafter.begin(context[:9])
    tree = drafter.propose(context, 6)
    assert tree.tokens == [4, 5, 6, 7, 8, 9] and tree.parents == [-1, 0, 1, 2, 3, 4]


def test_most_frequent_continuation_comes_first_within_budget() -> None:
    drafter = SuffixDrafter(min_score=0.0)
    context = [7, 8, 1, 2, 0, 7, 8, 3, 4, 5, 7, 8, 1, 2, 6, 7, 8]
    drafter.begin(context)
    for budget in (0, 1, 2, 5, 16):
        tree = drafter.propose(context, budget)
        assert len(tree) <= budget
        DraftTree(tree.tokens, tree.parents)
        if budget:
            assert (tree.tokens[0], tree.parents[0]) == (1, -1)  # "7 8" -> "1" twice, "3" once
    roots = [t for t, p in zip(tree.tokens, tree.parents) if p == -1]
    assert sorted(roots) == [1, 3]


def test_nothing_repeated_drafts_nothing() -> None:
    drafter = SuffixDrafter()
    drafter.begin([1, 2, 3])
    assert len(drafter.propose([1, 2, 3, 4], 8)) == 0


def test_global_trie_remembers_earlier_outputs() -> None:
    drafter = SuffixDrafter(min_score=0.0)
    drafter.begin([50, 51])
    drafter.end([10, 11, 12, 13, 14, 15])
    drafter.begin([60, 61])  # a new request: its own trie knows nothing of 10..15
    tree = drafter.propose([60, 61, 10, 11], 4)
    assert tree.tokens == [12, 13, 14, 15]


def test_global_trie_stays_within_its_cap() -> None:
    drafter = SuffixDrafter(global_max_tokens=100, prompt_tail=0)
    for i in range(30):
        drafter.begin([1])
        drafter.end([1000 + i] * 10)
    assert drafter.global_tokens <= 100
    assert sum(len(d) for d in drafter.documents) == drafter.global_tokens
    assert drafter.documents[-1] == [1029] * 10
    assert len(drafter.global_trie.seq) <= 100 + len(drafter.documents)


def test_greedy_generation_equals_ar_and_memory_raises_tau(tiny_llm) -> None:
    params = SamplingParams(max_tokens=32, temperature=0)
    for prompt in ["a b c d a b c d a b", "Hello there"]:
        ar = tiny_llm.generate(prompt, params, method="ar")[0]
        assert tiny_llm.generate(prompt, params, method="suffix")[0].token_ids == ar.token_ids, prompt
    prompt = "suffix memory test: 7 + 5 = ?"
    first = tiny_llm.generate(prompt, params, method="suffix")[0]
    again = tiny_llm.generate(prompt, params, method="suffix")[0]
    assert again.token_ids == first.token_ids == tiny_llm.generate(prompt, params, method="ar")[0].token_ids
    assert again.metrics.accepted_per_step > first.metrics.accepted_per_step
    assert again.metrics.accepted_per_step > 2.0


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_datastore_drafts_what_only_the_corpus_holds(tmp_path) -> None:
    """A .jsonl corpus of token ids: a request that starts a corpus phrase gets the rest of it
    drafted from its first step; with "start", only the answer and the PROMPT_TAIL tokens before
    it are kept (a train-head corpus keeps the whole chat template before the answer)."""
    rows = [{"ids": [90, 91, 92, 93, 94, 95]},
            {"ids": [70] * 20 + [30, 31, 32, 33], "start": 20}]  # 70 x 12, then the tail (8) + answer
    corpus = _write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    trie = load_datastore(corpus, lambda text: [], 100)
    drafter = SuffixDrafter(min_score=0.0, datastore=trie)
    drafter.begin([5, 6])
    assert drafter.propose([5, 6, 91, 92], 8).tokens == [93, 94, 95]
    assert drafter.propose([5, 6, 70, 30], 8).tokens == [31, 32, 33]
    assert trie.seq.count(70) == 8  # the 8 before the answer, not the 12 before them
    assert len(SuffixDrafter(min_score=0.0).propose([5, 6, 91, 92], 8)) == 0  # without it: nothing


def test_datastore_text_documents_end_at_blank_lines(tmp_path) -> None:
    """Text rows and plain text files are encoded; a blank line ends a document, so no draft runs
    from one block into the next."""
    encode = lambda text: [ord(c) % 128 for c in text]  # noqa: E731
    plain = load_datastore(_write(tmp_path / "c.txt", "abcdef\nxyz\n\nghij\n"), encode, 128)
    drafter = SuffixDrafter(min_score=0.0, datastore=plain)
    drafter.begin([1])
    assert drafter.propose([1] + encode("bcd"), 16).tokens == encode("ef\nxyz")  # ends with its block
    assert drafter.propose([1] + encode("hi"), 16).tokens == encode("j")
    rows = load_datastore(_write(tmp_path / "t.jsonl", json.dumps({"text": "klmnop"}) + "\n"), encode, 128)
    drafter = SuffixDrafter(min_score=0.0, datastore=rows)
    drafter.begin([1])
    assert drafter.propose([1] + encode("lm"), 16).tokens == encode("nop")


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ('{"ids": [1, 2]}\nnot json\n', "line 2"),
    ('{"ids": [1, 500]}\n', "token id 500 is outside the vocabulary [0, 100)"),
    ('{"tokens": [1]}\n', 'line 1: want {"text"'),
    ("\n\n", "holds no documents"),
])
def test_bad_datastores_are_refused_by_name(tmp_path, content, message) -> None:
    path = tmp_path / "c.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_datastore(path, lambda text: [], 100)
    assert str(path) in str(err.value)
    assert gc.isenabled()  # the collector, paused for the build, runs again


def test_datastore_is_built_with_the_collector_paused_then_frozen(tmp_path, monkeypatch) -> None:
    """The collector is off while the trie grows and on afterwards; the finished trie is in the
    permanent generation (full collections never walk it), and a paused collector stays paused."""
    seen = []
    real_extend = SuffixTrie.extend
    monkeypatch.setattr(SuffixTrie, "extend", lambda self, ids: (seen.append(gc.isenabled()), real_extend(self, ids)))
    path = _write(tmp_path / "c.jsonl", "".join(json.dumps({"ids": [1, 2, 3, k]}) + "\n" for k in range(4, 9)))
    try:
        trie = load_datastore(path, lambda text: [], 100)
        assert seen == [False] * 5 and gc.isenabled()
        assert not any(obj is trie.root for obj in gc.get_objects())  # frozen objects are in no generation
        gc.unfreeze()
        assert any(obj is trie.root for obj in gc.get_objects())
        gc.disable()
        load_datastore(path, lambda text: [], 100)
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


@pytest.fixture(scope="module")
def tiny_llm_dir_datastore(tiny_llama_dir, tiny_llm, tmp_path_factory):
    """(an LLM given a datastore, a prompt, `ar`'s greedy answer to it): the datastore holds that
    answer as a train-head corpus row would."""
    from fastdecode import LLM

    prompt_ids = list(range(3, 15))
    answer = tiny_llm.generate([prompt_ids], SamplingParams(max_tokens=24, temperature=0), method="ar")[0].token_ids
    path = tmp_path_factory.mktemp("datastore") / "corpus.jsonl"
    path.write_text(json.dumps({"ids": prompt_ids + answer, "start": len(prompt_ids)}) + "\n")
    return LLM(str(tiny_llama_dir), dtype="float32", datastore=str(path)), prompt_ids, answer


def test_llm_datastore_is_shared_and_lossless(tiny_llm_dir_datastore) -> None:
    """LLM(datastore=...) builds the trie once; every `suffix` drafter and `auto`'s suffix member
    draft from it, and the output stays `ar`'s. The corpus is the model's own greedy answer, so
    the first request that asks the same already drafts from it."""
    llm, prompt_ids, answer = tiny_llm_dir_datastore
    assert llm.new_drafter("suffix").datastore is llm.datastore is llm.new_drafter("auto").members["suffix"].datastore
    params = SamplingParams(max_tokens=24, temperature=0)
    for method in ("suffix", "auto"):
        out = llm.generate([prompt_ids], params, method=method)[0]
        assert out.token_ids == answer, method
        assert out.metrics.accepted_per_step > 2.0, method  # a fresh LLM: only the datastore knew it
    # sampled: a seed fixes every draw (sampling.py), so each method emits ar's sampled tokens
    for seed in range(3):
        sampled = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=seed)
        want = llm.generate([prompt_ids], sampled, method="ar")[0].token_ids
        for method in ("suffix", "auto"):
            assert llm.generate([prompt_ids], sampled, method=method)[0].token_ids == want, (method, seed)


def test_llm_encodes_a_text_datastore_with_its_tokenizer(tiny_llama_dir, tmp_path) -> None:
    from fastdecode import LLM

    path = _write(tmp_path / "notes.txt", "the cat sat on the mat\n\nand then it slept\n")
    llm = LLM(str(tiny_llama_dir), dtype="float32", datastore=str(path))
    want = llm.encode("the cat sat on the mat") + [SEPARATOR] + llm.encode("and then it slept") + [SEPARATOR]
    assert llm.datastore.seq == want
