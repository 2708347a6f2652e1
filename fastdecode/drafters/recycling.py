"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating Inference of
Large Language Models with Token Recycling"): draft from an adjacency matrix of recycled
candidate tokens.

The matrix `successors[token]` holds the top-k tokens the target model predicted after
`token` the last time it scored it. Every verification forward scores every tree node, the
rejected ones too, so each step refreshes up to `len(tree) + 1` rows for free: row i's top-k
becomes the successor list of the token at row i. Drafting walks a static tree template from
the root through the matrix: a template node (parent, rank) carries the rank-th successor of
its parent's token.

The template for a budget of n nodes is the best n-node tree under a per-rank hit rate p[r]
(the chance that the target's next token is the rank-r successor): nodes are taken in order of
their path probability prod(p[rank]) with a heap, so every sub-template is closed under
parents. p[r] starts from a prior and is re-estimated from the accepted paths, so the shape
(wide at the top, deep along rank 0) follows the model and task; the paper uses one fixed
hand-made 80-node tree.

The matrix persists across the requests of an LLM instance (the paper's "recycling" across
queries); `save` / `load` keep it across processes. Unknown rows (-1) prune their subtree.

Before any request the matrix starts from the model's own table (`model_successors`): every
token's successors when it follows a newline alone, all 49,152 tokens of SmolLM2-135M in one
~28 s pass of masked forwards (cached on disk by the LLM). Without it, the tokens no request had
scored yet drafted nothing: in 971 greedy `auto` steps over 14 Spec-Bench prompts 22.6 % had an
empty tree, every one at such a token; in those steps the table's top guess was the model's next
token 22.6 % of the time (top 4: 35.7 %). In-context rows replace table rows as the model scores them.
"""
from __future__ import annotations

import heapq
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastdecode.drafters.base import DraftRequest, StepResult
from fastdecode.kernels import race_orders_op, recycle_propose_op, recycle_update_op
from fastdecode.kv_cache import KVCache
from fastdecode.sampling import Sampler, int64_seed, top_rows
from fastdecode.tree import DraftTree

if TYPE_CHECKING:
    from fastdecode.model import Transformer

UNKNOWN = -1
# Prior hit rate of the rank-r successor; measured rates replace it as steps accumulate.
PRIOR_RANK_HITS = (0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)
PRIOR_WEIGHT = 20.0  # pseudo-observations behind the prior
MAX_DEPTH = 12
TABLE_PREFIX = "\n"  # the table scores each token after this text alone (better than " " or a chat turn)
TABLE_K = 8  # successors per token in the table
RETEMPLATE_EVERY = 64  # steps between re-estimates of the rank hit rates


def build_template(rank_hits: list[float], size: int, max_depth: int = MAX_DEPTH) -> list[tuple[int, int]]:
    """The `size` most probable nodes as (parent index or -1, rank), parents first, breadth-first.

    Worked example, rank_hits = [0.5, 0.2], size 4: candidates by path probability are
    r0 (.5), r0.r0 (.25), r1 (.2), r0.r0.r0 (.125) -> [(-1, 0), (-1, 1), (0, 0), (2, 0)].
    """
    heap: list[tuple[float, int, int, int, int]] = []  # (-prob, order, parent pick, rank, depth)
    order = 0
    for rank, hit in enumerate(rank_hits):
        heap.append((-hit, order, -1, rank, 1))
        order += 1
    heapq.heapify(heap)
    picked: list[tuple[int, int, int]] = []  # (parent pick index, rank, depth) in pick order
    while heap and len(picked) < size:
        neg_prob, _, parent, rank, depth = heapq.heappop(heap)
        picked.append((parent, rank, depth))
        if depth < max_depth:
            for child_rank, hit in enumerate(rank_hits):
                heapq.heappush(heap, (neg_prob * hit, order, len(picked) - 1, child_rank, depth + 1))
                order += 1
    by_depth = sorted(range(len(picked)), key=lambda i: (picked[i][2], i))  # stable: parents first
    new_index = {old: new for new, old in enumerate(by_depth)}
    return [(new_index[picked[i][0]] if picked[i][0] >= 0 else -1, picked[i][1]) for i in by_depth]


def model_successors(model: Transformer, prefix: list[int], k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Every token's k likeliest successors by `model` (int32 [vocab, k], best first) and their
    logits, when the token follows `prefix` alone. `chunk` tokens a forward, each row attending to
    the prefix and to itself."""
    cfg = model.cfg
    vocab, n_prefix = cfg.vocab_size, len(prefix)
    successors = np.empty((vocab, k), dtype=np.int32)
    logits = np.empty((vocab, k), dtype=np.float32)
    cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, n_prefix + chunk, model.kv_dtype)
    if prefix:
        model(torch.tensor(prefix), torch.arange(n_prefix), cache)
        cache.append(n_prefix)
    for start in range(0, vocab, chunk):
        tokens = torch.arange(start, min(vocab, start + chunk))
        n = len(tokens)
        mask = torch.zeros(n, n_prefix + n, dtype=torch.bool)
        mask[:, :n_prefix] = True
        mask[:, n_prefix:].fill_diagonal_(True)
        successors[start : start + n], logits[start : start + n] = top_rows(
            model(tokens, torch.full((n,), n_prefix), cache, mask), k)
    return successors, logits


class TokenRecycling:
    """Drafter: walk a budget-sized BFS template from the root through the successor matrix."""

    def __init__(self, vocab_size: int, k: int = 8, table: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """`table`: (successors, logits) [vocab, >= k] to start from (`model_successors`); else empty."""
        if k < 1 or k > vocab_size:
            raise ValueError(f"k={k} successors per token must be in [1, vocab_size={vocab_size}]")
        self.vocab_size, self.k = vocab_size, k
        self.successors = np.full((vocab_size, k), UNKNOWN, dtype=np.int32)  # [vocab, k]: 1.5 MB at 49k x 8
        self.logits = np.zeros((vocab_size, k), dtype=np.float32)  # the successors' logits when they were scored
        if table is not None:
            if table[0].shape[0] != vocab_size or table[0].shape[1] < k:
                raise ValueError(f"a table of shape {table[0].shape} does not cover vocab_size={vocab_size}, k={k}")
            self.successors[:] = table[0][:, :k]
            self.logits[:] = table[1][:, :k]
        self.scored = np.zeros(vocab_size, dtype=bool)  # rows the target scored in a request's context
        self.sampler: Sampler | None = None  # the request's, when it samples: drafts follow its noise
        self._orders: dict[tuple[int, int], list[int]] = {}  # (token, output index) -> race order, this step's
        self.rank_hits = np.zeros(k)  # accepted-path observations per rank
        self.rank_trials = 0
        self.steps = 0
        self._templates: dict[int, list[tuple[int, int]]] = {}
        self._template_cols: dict[int, tuple[list, list[int], list[int]]] = {}  # _template_lists()
        self._views: tuple[tuple[np.ndarray, ...], tuple[torch.Tensor, ...]] | None = None  # _tensors()

    # -- Drafter protocol --------------------------------------------------------------------
    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        """Seed the rows the model never scored in a context with the prompt's own bigrams (last
        one wins): the prompt's successor goes first, the row's others (a table's) move down."""
        sampler = request.sampler if request is not None else None
        self.sampler = sampler if sampler is not None and not sampler.params.greedy else None
        self._orders.clear()
        if len(prompt_ids) < 2:
            return
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        prev, nxt = prompt[:-1], prompt[1:]
        fresh = ~self.scored[prev]
        prev, nxt = prev[fresh][::-1], nxt[fresh][::-1]
        prev, last = np.unique(prev, return_index=True)  # the first of the reversed: the last bigram
        nxt = nxt[last]
        rows, logits = self.successors[prev], self.logits[prev]
        found = rows == nxt[:, None]
        moved = np.where(found.any(1), found.argmax(1), self.k - 1)  # nxt's old rank, else the last (dropped)
        ranks = np.arange(self.k)
        source = np.where((ranks <= moved[:, None]) & (ranks > 0), ranks - 1, ranks)  # ranks 1..moved shift down
        new_rows = np.take_along_axis(rows, source, 1)
        new_rows[:, 0] = nxt
        new_logits = np.take_along_axis(logits, source, 1)  # nxt takes the row's best logit (an unknown row's 0)
        self.successors[prev], self.logits[prev] = new_rows, new_logits

    def propose(self, context: list[int], budget: int) -> DraftTree:
        """Walk the template; a node lives if its parent did and its successor is known. One native
        call where the kernels are built, else a Python loop over the (at most `budget`) nodes
        (numpy per depth cost ~0.1 ms a step in place)."""
        if budget <= 0:
            return DraftTree()
        self._orders.clear()
        op = recycle_propose_op()
        if op is not None:  # the same walk in one native call: ~70 -> ~15 us a sampled step in place
            s = self.sampler  # temperature 0: the walk takes ranks as stored
            race = (0.0, 0, 1.0, 0, 0) if s is None else (s.params.temperature, s.params.top_k, s.params.top_p,
                                                           int64_seed(s.seed), s.count)
            successors, logits, _ = self._tensors()
            return DraftTree(*op(successors, logits, *self._template_lists(budget), context[-1], *race))
        successors, root = self.successors, context[-1]
        token_of: list[int] = []  # per template node: its token, or UNKNOWN when it is dead
        index_of: list[int] = []  # per template node: its draft index (-1 when dead)
        depth_of: list[int] = []  # per template node: its depth (1 = a child of the root)
        tokens: list[int] = []
        parents: list[int] = []
        for parent, rank in self._template(budget):
            parent_token = root if parent < 0 else token_of[parent]
            depth_of.append(1 if parent < 0 else depth_of[parent] + 1)
            if parent_token != UNKNOWN and self.sampler is not None:  # the child's output index
                rank = self._race_order(parent_token, self.sampler.count + depth_of[-1] - 1)[rank]
            token = UNKNOWN if parent_token == UNKNOWN else int(successors[parent_token, rank])
            token_of.append(token)
            if token == UNKNOWN:
                index_of.append(-1)
                continue
            index_of.append(len(tokens))
            tokens.append(token)
            parents.append(-1 if parent < 0 else index_of[parent])
        return DraftTree(tokens, parents)

    def update(self, step: StepResult) -> None:
        rows = [step.root] + step.tree.tokens
        row_tokens = np.asarray(rows, dtype=np.int64)
        self._count_rank_hits(row_tokens, step)
        top, values = step.top(self.k)  # [len(tree) + 1, k], shared with the other drafters
        op = recycle_update_op()
        if op is not None:  # the same in one native call: ~75 -> ~20 us a step in place
            op(*self._tensors(), rows, torch.from_numpy(np.ascontiguousarray(top)),
               torch.from_numpy(np.ascontiguousarray(values)), step.accepted_rows)
        else:
            self.successors[row_tokens] = top
            self.logits[row_tokens] = values
            accepted = np.asarray(step.accepted_rows)
            self.successors[row_tokens[accepted]] = top[accepted]  # on duplicates the accepted context wins
            self.logits[row_tokens[accepted]] = values[accepted]
            self.scored[row_tokens] = True
        self.steps += 1
        if self.steps % RETEMPLATE_EVERY == 0:
            self._templates.clear()

    def end(self, output_ids: list[int]) -> None:
        return None

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        torch.save({"successors": torch.from_numpy(self.successors), "logits": torch.from_numpy(self.logits),
                    "scored": torch.from_numpy(self.scored), "rank_hits": torch.from_numpy(self.rank_hits),
                    "rank_trials": self.rank_trials}, str(path))

    def load(self, path: str | Path) -> None:
        state = torch.load(str(path), weights_only=True)
        successors = state["successors"].numpy()
        if successors.shape != self.successors.shape:
            raise ValueError(
                f"{path} holds a successor matrix of shape {tuple(successors.shape)}; "
                f"this drafter needs {tuple(self.successors.shape)} (vocab_size, k)"
            )
        self.successors = successors.astype(np.int32, copy=True)
        logits = state.get("logits")  # absent in files saved before the successors' logits were kept
        self.logits = (np.zeros(successors.shape, dtype=np.float32) if logits is None
                       else logits.numpy().astype(np.float32, copy=True))
        scored = state.get("scored")  # absent in files saved before tables: every known row was scored
        self.scored = (self.successors[:, 0] != UNKNOWN) if scored is None else scored.numpy().astype(bool, copy=True)
        self.rank_hits = state["rank_hits"].numpy().astype(np.float64, copy=True)
        self.rank_trials = int(state["rank_trials"])
        self._templates.clear()

    # -- internals -----------------------------------------------------------------------------
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tensors sharing the successors', their logits' and `scored`'s memory, made again only
        when an array is replaced (a torch.from_numpy costs ~10 us in place)."""
        arrays = (self.successors, self.logits, self.scored)
        if self._views is None or any(a is not b for a, b in zip(arrays, self._views[0])):
            self._views = (arrays, tuple(torch.from_numpy(a) for a in arrays))
        return self._views[1]

    def rank_hit_rates(self) -> list[float]:
        """Estimated chance that the target's next token is the rank-r successor."""
        prior = np.asarray(PRIOR_RANK_HITS[: self.k] + (0.01,) * max(0, self.k - len(PRIOR_RANK_HITS)))
        rates = (self.rank_hits + PRIOR_WEIGHT * prior) / (self.rank_trials + PRIOR_WEIGHT)
        return [min(float(r), 0.95) for r in rates]

    def _template(self, budget: int) -> list[tuple[int, int]]:
        """The budget-sized template as (parent template index or -1, rank), parents first."""
        if budget not in self._templates:
            self._templates[budget] = build_template(self.rank_hit_rates(), budget)
        return self._templates[budget]

    def _template_lists(self, budget: int) -> tuple[list[int], list[int]]:
        """The template as the native walk takes it: parents and ranks, built once per template."""
        template = self._template(budget)
        lists = self._template_cols.get(budget)
        if lists is None or lists[0] is not template:
            lists = self._template_cols[budget] = (template, [p for p, _ in template], [r for _, r in template])
        return lists[1], lists[2]

    def _race_order(self, token: int, index: int) -> list[int]:
        """The ranks of `token`'s successors in the order the sampler's race at output `index` would
        pick them if the target's distribution were the one they were scored with: softmax of their
        logits at the request's temperature, cut to its top_k and top_p among them. Kept from a
        propose() to the update() after it, which asks again for the accepted rows."""
        order = self._orders.get((token, index))
        if order is None:
            order = self._orders[(token, index)] = self._race(token, index)
        return order

    def _race(self, token: int, index: int) -> list[int]:
        if race_orders_op() is not None:
            return self._native_race_orders([(token, index)])[0]
        params = self.sampler.params
        known = self.successors[token] != UNKNOWN
        if not known.any():
            return list(range(self.k))
        x = self.logits[token].astype(np.float64) / params.temperature
        p = np.where(known, np.exp(x - x[known].max()), 0.0)
        p /= p.sum()
        if 0 < params.top_k < self.k:
            p[params.top_k:] = 0.0
        p[(np.cumsum(p) - p) >= params.top_p] = 0.0  # the nucleus, best first as stored
        return self.sampler.race_order(np.maximum(self.successors[token], 0), p, index - self.sampler.count)

    def _count_rank_hits(self, row_tokens: np.ndarray, step: StepResult) -> None:
        """At every accepted row, which rank of its (pre-update) successor list the target chose."""
        # a Python loop: a step accepts a few rows, and ~10 numpy calls on such tiny arrays cost more
        seen = []  # per accepted row with known successors: (its token, them as stored, the token chosen, its output index)
        for j, (row, chosen) in enumerate(zip(step.accepted_rows, step.emitted)):
            ranks = self.successors[row_tokens[row]].tolist()
            if ranks[0] != UNKNOWN:  # emitted[j] had output index count - len + j
                seen.append((int(row_tokens[row]), ranks, chosen, self.sampler.count - len(step.emitted) + j
                             if self.sampler is not None else 0))
        if self.sampler is not None and seen:  # ranks as propose() drew them: in the race's order
            for (token, ranks, _, index), order in zip(seen, self._race_orders([(t, i) for t, _, _, i in seen])):
                ranks[:] = [ranks[i] for i in order]
        for _, ranks, chosen, _ in seen:
            self.rank_trials += 1
            if chosen in ranks:
                self.rank_hits[ranks.index(chosen)] += 1

    def _race_orders(self, pairs: list[tuple[int, int]]) -> list[list[int]]:
        """_race_order for several (token, output index) pairs: one native call for those propose()
        did not already order."""
        missing = [pair for pair in pairs if pair not in self._orders]
        if race_orders_op() is not None and missing:
            self._orders.update(zip(missing, self._native_race_orders(missing)))
        return [self._race_order(*pair) for pair in pairs]

    def _native_race_orders(self, pairs: list[tuple[int, int]]) -> list[list[int]]:
        """The race orders of (token, output index) pairs in one call of the native op (which must exist)."""
        params, (successors, logits, _) = self.sampler.params, self._tensors()
        flat = race_orders_op()(successors, logits, [t for t, _ in pairs], [i for _, i in pairs], params.temperature,
                                params.top_k, params.top_p, int64_seed(self.sampler.seed))
        return [flat[n * self.k : (n + 1) * self.k] for n in range(len(pairs))]
