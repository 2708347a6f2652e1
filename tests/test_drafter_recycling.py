"""Token Recycling: the successor matrix learns from every scored row, drafts walk it through a
budget-sized template, the matrix survives save/load, and greedy output equals AR."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.drafters.base import DraftRequest, StepResult
from fastdecode.drafters.recycling import UNKNOWN, TokenRecycling, build_template, model_successors
from fastdecode.kernels import race_orders_op, recycle_propose_op
from fastdecode.sampling import Sampler
from fastdecode.tree import DraftTree

VOCAB = 50


def ranked_logits(rows: list[list[int]], vocab: int = VOCAB) -> torch.Tensor:
    """`[len(rows), vocab]` logits whose top tokens per row are `rows[i]`, best first."""
    logits = torch.zeros(len(rows), vocab)
    for i, ranked in enumerate(rows):
        for rank, token in enumerate(ranked):
            logits[i, token] = 10.0 - rank
    return logits


def test_template_is_the_most_probable_subtree() -> None:
    assert build_template([0.5, 0.2], 4) == [(-1, 0), (-1, 1), (0, 0), (2, 0)]
    for size in (1, 5, 16, 60):
        nodes = build_template([0.5, 0.2, 0.1, 0.05], size)
        assert len(nodes) == size
        assert all(-1 <= parent < i for i, (parent, _) in enumerate(nodes))
    small, large = build_template([0.5, 0.2, 0.1], 6), build_template([0.5, 0.2, 0.1], 12)
    paths = lambda nodes: {_path(nodes, i) for i in range(len(nodes))}  # noqa: E731
    assert paths(small) <= paths(large)  # a larger budget only adds nodes


def _path(nodes: list[tuple[int, int]], i: int) -> tuple[int, ...]:
    ranks = []
    while i >= 0:
        ranks.append(nodes[i][1])
        i = nodes[i][0]
    return tuple(reversed(ranks))


def test_matrix_rows_come_from_every_scored_row() -> None:
    drafter = TokenRecycling(VOCAB, k=3)
    tree = DraftTree([5, 6], [-1, 0])  # root 4 -> 5 -> 6
    logits = ranked_logits([[5, 7, 8], [9, 10, 11], [12, 13, 14]])
    # the target chose 5 at the root, then 9 (not 6): row 2 was rejected but is still recycled
    drafter.update(StepResult(4, tree, logits, [0, 1], [5, 9]))
    assert drafter.successors[4].tolist() == [5, 7, 8]
    assert drafter.successors[5].tolist() == [9, 10, 11]
    assert drafter.successors[6].tolist() == [12, 13, 14]


def test_accepted_context_wins_when_a_token_repeats() -> None:
    drafter = TokenRecycling(VOCAB, k=2)
    tree = DraftTree([5, 7, 5], [-1, -1, 1])  # token 5 twice: rejected row 1, accepted row 3
    logits = ranked_logits([[7, 1], [20, 21], [5, 2], [30, 31]])
    drafter.update(StepResult(4, tree, logits, [0, 2, 3], [7, 5, 30]))
    assert drafter.successors[5].tolist() == [30, 31]


def test_propose_walks_the_matrix_from_the_root() -> None:
    drafter = TokenRecycling(VOCAB, k=3)
    drafter.successors[1] = [2, 3, 4]
    drafter.successors[2] = [5, 6, 7]
    drafter.successors[5] = [8, 9, 10]
    tree = drafter.propose([0, 1], 3)
    assert sorted(tree.paths()) == [[2, 5], [3]]  # rank 0 twice (.45 * .45) beats rank 1 (.12)
    chain = drafter.propose([0, 1], 12)
    assert [2, 5, 8] in [p[:3] for p in chain.paths()]  # rank 0 is followed deepest
    assert set(chain.tokens[:3]) <= {2, 3, 4}


@pytest.mark.parametrize("budget", [0, 1, 2, 5, 16, 40])
def test_budget_respected_and_tree_valid(budget: int) -> None:
    drafter = TokenRecycling(VOCAB, k=4)
    rng = np.random.default_rng(0)
    drafter.successors[:] = np.stack([rng.permutation(VOCAB)[:4] for _ in range(VOCAB)])
    tree = drafter.propose([3, 1], budget)
    assert len(tree) == budget  # a full matrix fills the template exactly
    DraftTree(tree.tokens, tree.parents)  # re-validates parents
    for kids in tree.children():
        assert len(kids) == len(set(kids))


def test_unknown_rows_prune_the_template() -> None:
    drafter = TokenRecycling(VOCAB, k=4)
    assert len(drafter.propose([1], 16)) == 0
    drafter.successors[1, 0] = 2  # one known successor, nothing known after it
    tree = drafter.propose([1], 16)
    assert tree.tokens == [2] and tree.parents == [-1]


def test_prompt_bigrams_seed_only_rows_never_scored_in_a_context() -> None:
    drafter = TokenRecycling(VOCAB, k=3)
    drafter.update(StepResult(3, DraftTree(), ranked_logits([[40, 41, 42]]), [0], [40]))  # the model scored 3
    drafter.successors[5] = [7, 8, 9]  # a table's row: not scored in a context
    drafter.begin([1, 2, 3, 4, 5, 6, 1, 9])
    assert drafter.successors[1].tolist() == [9, UNKNOWN, UNKNOWN]  # the last bigram wins
    assert drafter.successors[2, 0] == 3
    assert drafter.successors[3].tolist() == [40, 41, 42]  # the model's own list is kept
    assert drafter.successors[5].tolist() == [6, 7, 8]  # first, the table's move down (the last drops)
    assert drafter.successors[9, 0] == UNKNOWN
    drafter.begin([5, 8])
    assert drafter.successors[5].tolist() == [8, 6, 7]  # an entry already there moves up, none is lost


def test_save_load_round_trip(tmp_path) -> None:
    drafter = TokenRecycling(VOCAB, k=3)
    drafter.update(StepResult(4, DraftTree([5], [-1]), ranked_logits([[5, 7, 8], [9, 10, 11]]), [0, 1], [5, 9]))
    drafter.save(tmp_path / "matrix.pt")
    restored = TokenRecycling(VOCAB, k=3)
    restored.load(tmp_path / "matrix.pt")
    assert np.array_equal(restored.successors, drafter.successors)
    assert np.array_equal(restored.logits, drafter.logits) and np.array_equal(restored.scored, drafter.scored)
    assert restored.rank_hit_rates() == drafter.rank_hit_rates()
    assert restored.propose([4], 8).tokens == drafter.propose([4], 8).tokens
    with pytest.raises(ValueError, match="vocab_size, k"):
        TokenRecycling(VOCAB, k=4).load(tmp_path / "matrix.pt")


def test_rank_hit_rates_follow_accepted_paths() -> None:
    drafter = TokenRecycling(VOCAB, k=2)
    drafter.successors[4] = [5, 6]
    before = drafter.rank_hit_rates()
    for _ in range(50):  # the target always picks the rank-1 successor of 4
        drafter.update(StepResult(4, DraftTree(), ranked_logits([[5, 6]]), [0], [6]))
        drafter.successors[4] = [5, 6]
    after = drafter.rank_hit_rates()
    assert after[1] > before[1] and after[0] < before[0]


@pytest.mark.parametrize("vocab,k", [(VOCAB, 4), (49152, 8)])
def test_native_update_equals_numpy(monkeypatch: pytest.MonkeyPatch, vocab: int, k: int) -> None:
    """The native table update (one call) leaves the successors, their logits and `scored` exactly
    as the numpy route does, over steps whose trees repeat tokens (accepted rows win) and whose
    rows hold NaNs (fewer than k successors: unknown, logit 0); bad rows are refused."""
    import fastdecode.drafters.recycling as recycling
    from fastdecode.kernels import recycle_update_op

    op = recycle_update_op()
    assert op is not None, "the fastdecode kernels failed to build"
    rng = np.random.default_rng(vocab)
    native, plain = TokenRecycling(vocab, k=k), TokenRecycling(vocab, k=k)
    for step in range(12):
        tokens = rng.integers(0, 6, size=int(rng.integers(0, 7))).tolist()  # few tokens: duplicates
        tree = DraftTree(tokens, [i - 1 for i in range(len(tokens))])
        logits = torch.from_numpy(rng.standard_normal((len(tokens) + 1, vocab)).astype(np.float32))
        if step % 3 == 0:
            logits[0, k // 2 :] = float("nan")  # row 0 keeps only k // 2 values
        accepted = list(range(int(rng.integers(1, len(tokens) + 2))))
        root = int(rng.integers(0, 6))
        native.update(StepResult(root, tree, logits, accepted, [1] * len(accepted)))
        with monkeypatch.context() as m:
            m.setattr(recycling, "recycle_update_op", lambda: None)
            plain.update(StepResult(root, tree, logits, accepted, [1] * len(accepted)))
        assert np.array_equal(native.successors, plain.successors)
        assert np.array_equal(native.logits, plain.logits)
        assert np.array_equal(native.scored, plain.scored)
    assert (native.successors[:6] != UNKNOWN).any() and native.scored[:6].any()
    tables = (torch.from_numpy(native.successors), torch.from_numpy(native.logits), torch.from_numpy(native.scored))
    top, values = torch.zeros(2, k, dtype=torch.long), torch.zeros(2, k)
    with pytest.raises(RuntimeError, match=f"row token {vocab} is outside"):
        op(*tables, [0, vocab], top, values, [0])
    with pytest.raises(RuntimeError, match="accepted row 2 is outside"):
        op(*tables, [0, 1], top, values, [2])
    with pytest.raises(RuntimeError, match=r"\[rows = 1, k = "):
        op(*tables, [0], top, values, [0])


@pytest.mark.parametrize("n,vocab,k", [(1, 49152, 8), (9, 49152, 8), (3, 320, 8), (2, 10, 3), (4, 8192, 4)])
def test_top_k_rows_equals_torch_topk(n: int, vocab: int, k: int) -> None:
    """The chunked search (wide rows) and the plain one (narrow rows) find torch.topk's indices in order."""
    from fastdecode.sampling import top_k_rows

    x = np.random.default_rng(n * vocab).standard_normal((n, vocab)).astype(np.float32)
    assert (top_k_rows(x, k) == torch.from_numpy(x).topk(k, dim=-1).indices.numpy()).all()


@pytest.mark.parametrize("n,vocab,k", [(1, 49152, 8), (9, 49152, 8), (3, 320, 8), (2, 10, 3), (4, 8192, 4), (2, 13, 13)])
def test_native_top_k_rows_equals_torch_topk(n: int, vocab: int, k: int) -> None:
    """The native op recycling's update uses: torch.topk's indices in order (no ties in random
    data), ties to the lower index, NaNs never picked, a bad k refused."""
    from fastdecode.kernels import top_k_rows_op

    op = top_k_rows_op()
    assert op is not None, "the fastdecode kernels failed to build"
    x = torch.from_numpy(np.random.default_rng(n * vocab).standard_normal((n, vocab)).astype(np.float32))
    expected = x.topk(k, dim=-1)
    top, values = op(x, k)
    assert torch.equal(top, expected.indices) and torch.equal(values, expected.values)
    tied = torch.tensor([[1.0, 3.0, 3.0, float("nan"), 2.0, 3.0, 0.0, 3.0, 1.0, 5.0]])
    assert op(tied, 4)[0].tolist() == [[9, 1, 2, 5]]
    assert op(torch.full((1, 3), float("nan")), 2)[0].tolist() == [[-1, -1]]
    if vocab > 30001:  # a wide row (the 64-value tests): NaNs beside the best values in their
        wide = x[:1].clone()  # blocks are never picked, nor do they hide a value beside them
        wide[0, 100::37] = float("nan")
        wide[0, 4001], wide[0, 4005], wide[0, 30000], wide[0, 30001] = float("nan"), 50.0, 40.0, float("nan")
        wide[0, 4013], wide[0, 30008] = float("nan"), float("nan")  # 8 on: the same lane of the next vector
        got = op(wide, k)
        want = torch.nan_to_num(wide, nan=float("-inf")).topk(k, dim=-1)
        assert got[0][0, :2].tolist() == [4005, 30000]
        assert torch.equal(got[0], want.indices) and torch.equal(got[1], want.values)
    with pytest.raises(RuntimeError, match="k = 0"):
        op(x, 0)


def test_sampled_drafts_follow_the_samplers_noise() -> None:
    """At temperature > 0 the successors are drawn in the order the request's sampler would pick
    them if their stored logits were the target's: with the whole vocabulary stored and the same
    logits at the next positions, every draft along rank 0 is the target's own sampled token."""
    vocab = 24
    gen = torch.Generator().manual_seed(5)
    hits = not_argmax = runs = rank0 = 0
    for seed in range(30):
        drafter = TokenRecycling(vocab, k=vocab)
        rows = 1.5 * torch.randn(3, vocab, generator=gen)
        sampler = Sampler(SamplingParams(temperature=0.7, top_p=0.9, seed=seed), [], vocab)
        sampler.accept(0)
        drafter.begin([0], DraftRequest(sampler, None))
        root = 3
        drafter.update(StepResult(root, DraftTree(), rows[:1], [0], [int(rows[0].argmax())]))
        first = sampler.draft(rows[0], 0)  # the target's pick after the root, with its noise
        if first == root:
            continue  # its row would be overwritten below
        runs += 1
        drafter.update(StepResult(first, DraftTree(), rows[1:2], [0], [int(rows[1].argmax())]))
        drafter.rank_hits[:], drafter.rank_trials = 0, 0  # those updates are not draft outcomes
        tree = drafter.propose([0, root], 2)  # rank 0 twice: a chain (when the first draft is right)
        hits += tree.tokens == [first, sampler.draft(rows[1], 1)]
        not_argmax += first != int(rows[0].argmax())
        sampler.accept(first)  # the target took it: its rank is counted in the order it was drafted
        drafter.update(StepResult(root, DraftTree(), rows[:1], [0], [first]))
        rank0 += drafter.rank_hits[0]
    assert runs >= 25 and hits >= runs - 2  # float64 here, float32 in the sampler: a rare nucleus-edge case may differ
    assert rank0 >= runs - 2
    assert not_argmax >= 5  # so the walk followed the noise, not the logits' order


def test_greedy_requests_draft_in_logit_order() -> None:
    drafter = TokenRecycling(VOCAB, k=3)
    drafter.update(StepResult(4, DraftTree(), ranked_logits([[5, 7, 8]]), [0], [5]))
    drafter.begin([0], DraftRequest(Sampler(SamplingParams(temperature=0), [], VOCAB), None))
    assert drafter.propose([4], 1).tokens == [5]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.9), (1.3, 3, 1.0), (0.5, -1, 0.97), (1.0, 8, 0.99)])
def test_native_race_order_equals_numpy(temperature: float, top_k: int, top_p: float, monkeypatch) -> None:
    assert race_orders_op() is not None, "the fastdecode kernels failed to build"
    rng = np.random.default_rng(1)
    drafter = TokenRecycling(VOCAB, k=8)
    for token in range(VOCAB):
        known = rng.integers(0, 9) if token % 5 else 8  # some rows partly or wholly unknown
        drafter.successors[token, :known] = rng.permutation(VOCAB)[:known]
        drafter.logits[token] = np.sort(rng.normal(0, 2, 8))[::-1]
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=2**63 + 5), [], VOCAB)
    drafter.begin([0], DraftRequest(sampler, None))
    native = [drafter._race(token, index) for token in range(VOCAB) for index in (0, 3)]
    assert drafter._race_orders([(token, index) for token in range(VOCAB) for index in (0, 3)]) == native  # batched
    monkeypatch.setattr("fastdecode.drafters.recycling.race_orders_op", lambda: None)
    assert native == [drafter._race(token, index) for token in range(VOCAB) for index in (0, 3)]
    assert len({tuple(order) for order in native}) >= 5  # the orders differ: the test compares something


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 3, 1.0), (1.0, 8, 0.99)])
def test_native_walk_equals_python(temperature: float, top_k: int, top_p: float, monkeypatch) -> None:
    """propose() by recycle_propose and by the Python loop: the same trees, greedy and sampled, over
    a table with unknown successors (dead branches) and templates of several budgets."""
    assert recycle_propose_op() is not None, "the fastdecode kernels failed to build"
    rng = np.random.default_rng(3)
    drafter = TokenRecycling(VOCAB, k=8)
    for token in range(VOCAB):
        known = rng.integers(0, 9) if token % 4 else 8
        drafter.successors[token, :known] = rng.permutation(VOCAB)[:known]
        drafter.logits[token] = np.sort(rng.normal(0, 2, 8))[::-1]
    drafter.rank_hits[:] = rng.uniform(0, 50, 8)  # a template less regular than the prior's
    drafter.rank_trials = 60
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=11), [], VOCAB)
    drafter.begin([0], DraftRequest(sampler, None))
    cases = [(root, budget, count) for root in range(0, VOCAB, 3) for budget in (1, 5, 24) for count in (0, 7)]

    def trees() -> list[tuple[list[int], list[int]]]:
        out = []
        for root, budget, count in cases:
            sampler.count = count
            tree = drafter.propose([root], budget)
            out.append((tree.tokens, tree.parents))
        return out

    native = trees()
    monkeypatch.setattr("fastdecode.drafters.recycling.recycle_propose_op", lambda: None)
    assert native == trees()
    assert sum(len(t) for t, _ in native) > 2 * len(cases)  # the walks go somewhere
    assert any(len(t) < budget for (t, _), (_, budget, _) in zip(native, cases))  # and some branches die


def test_model_table_is_each_tokens_successors_after_the_prefix(tiny_llm) -> None:
    """The batched, masked table equals one plain forward of prefix + token per token."""
    model = tiny_llm.model
    prefix = tiny_llm.encode("\n")
    successors, logits = model_successors(model, prefix, 4, chunk=7)  # chunks that do not divide the vocabulary
    assert successors.shape == logits.shape == (model.cfg.vocab_size, 4)
    for token in (0, 5, 6, 7, 100, model.cfg.vocab_size - 1):
        ids = prefix + [token]
        row = model(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(), last_only=True)[0]
        assert torch.allclose(torch.from_numpy(logits[token]), row[successors[token]], atol=1e-4)
        assert successors[token, 0] == int(row.argmax())
        assert (np.diff(logits[token]) <= 0).all()


def test_a_table_drafts_for_tokens_no_request_scored(tiny_llm) -> None:
    vocab = tiny_llm.model.cfg.vocab_size
    table = tiny_llm.successor_table()
    drafter = TokenRecycling(vocab, k=4, table=table)
    assert drafter.propose([0, 17], 1).tokens == [int(table[0][17, 0])]
    assert TokenRecycling(vocab, k=4).propose([0, 17], 4).tokens == []  # without it: nothing to draft
    with pytest.raises(ValueError, match="does not cover"):
        TokenRecycling(vocab + 1, k=4, table=table)


def test_the_llm_builds_its_table_once_and_caches_it_on_disk(tiny_llama_dir, tmp_path, monkeypatch) -> None:
    from fastdecode import LLM
    import fastdecode.llm as llm_module

    monkeypatch.setenv("FASTDECODE_CACHE", str(tmp_path))
    builds = []
    real = llm_module.model_successors
    monkeypatch.setattr(llm_module, "model_successors", lambda *a: builds.append(1) or real(*a))
    first = LLM(str(tiny_llama_dir), dtype="float32")
    table = first.successor_table()
    assert first.successor_table() is table and len(builds) == 1
    assert list((tmp_path / "recycling").glob("*.npz"))
    again = LLM(str(tiny_llama_dir), dtype="float32").successor_table()  # a new process would load it too
    assert len(builds) == 1 and np.array_equal(again[0], table[0]) and np.array_equal(again[1], table[1])
    LLM(str(tiny_llama_dir), dtype="bfloat16").successor_table()  # another dtype: the same model's table
    assert len(builds) == 1
    (tiny_llama_dir / "config.json").touch()  # a changed model file: a new table
    LLM(str(tiny_llama_dir), dtype="float32").successor_table()
    assert len(builds) == 2
    for cached in (tmp_path / "recycling").glob("*.npz"):
        cached.write_bytes(b"not a table")  # a damaged cache is built again, not a crash
    rebuilt = LLM(str(tiny_llama_dir), dtype="float32").successor_table()
    assert len(builds) == 3 and np.array_equal(rebuilt[0], table[0])
