"""`head`: drafting with a small trained head over the target's own hidden states (EAGLE, Li et
al. 2024; its dynamic tree after EAGLE-2).

The head is one decoder layer of the target's shape. Its input at position j is the target's
final hidden state (after the last norm) at j joined with the embedding of the token at j + 1;
its output is a guess of the target's hidden state at j + 1, which the target's own (tied) LM
head, cut to the head's vocabulary, turns into logits for the token at j + 2. Its attention runs
over its own KV cache of the context, so it sees the whole sequence of the target's states.

Per step: the rows the last verification accepted (their hidden states, the tokens that followed
them) are fed to the head; its last output guesses the token after the root, giving depth 1.
Each further depth (`depth` > 1) is one head call over the best frontier nodes (by the product
of the head's probabilities along the path), fed with their parent's guessed state. The tree
keeps the `budget` best nodes. Drafts only propose; the verifier keeps the output exactly the
target's.

The target's hidden states are read from `Transformer.hidden` (set by every `forward`). Where
they are missing or do not match the step (the batched server forward), the head starts its
context again from the next step it sees.

The head's weights come from `fastdecode train-head` (see headtrain.py): a safetensors file with
Hugging Face-style names, the vocabulary subset as `vocab`, and the target's shape in its metadata.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastdecode.config import ModelConfig
from fastdecode.drafters.base import DraftRequest, DrafterEnv, StepResult
from fastdecode.kv_cache import KVCache
from fastdecode.model import Block, Linear, RMSNorm, Transformer, fuse_hf_state, into_huge_pages, pack_linears_amx
from fastdecode.kernels import amx_bf16, attention_op, layer_ops
from fastdecode.tree import DraftTree

FORMAT = "fastdecode-draft-head-1"
# Tree shape. Each depth past the first is one more head call (~0.4 ms with Python, SmolLM2-135M's
# head) and more rows in the verifying forward, whose attention over a long prompt costs per row.
# With the 4-epoch head of the README, alone, interleaved per prompt (14 Spec-Bench prompts, 256
# tokens, greedy): depth 1 / 2 / 3 gave tau 1.55 / 1.75 / 1.78 at 171 / 153 / 153 decode tok/s
# (`ar` 141). So one depth by default; `depth` asks for more.
TOP_K = 4  # children a frontier node proposes
FRONTIER = 4  # nodes expanded per depth
DEPTH = 1
MIN_SCORE = 0.05  # a frontier node whose path probability is below this is not expanded


class DraftHead(nn.Module):
    """fc([feature, embedding]) -> one decoder layer -> norm; logits over `vocab` via the target's LM head."""

    def __init__(self, cfg: ModelConfig, vocab: torch.Tensor) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.fc = Linear(2 * d, d, bias=False)
        self.block = Block(cfg)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.lm = Linear(d, len(vocab), bias=False)
        self.register_buffer("vocab", vocab.long(), persistent=False)

    def forward(self, feats: torch.Tensor, embeds: torch.Tensor, rot: torch.Tensor, cache: KVCache,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Guessed next hidden states `[n, d]` for rows (feature, next token's embedding); their K/V
        are left pending in `cache` (layer 0)."""
        x = self.fc(torch.cat([feats, embeds], -1))
        kernel = attention_op()
        rot_real = torch.view_as_real(rot) if kernel is not None else None
        if kernel is not None and mask is not None:
            mask = mask.contiguous()
        return self.norm(self.block(x, rot, cache, 0, mask, kernel, rot_real))

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return self.lm(states)

    def first_guess(self, target: Transformer, hidden: torch.Tensor, tokens: list[int], positions: slice,
                    cache: KVCache, k: int) -> tuple[torch.Tensor, list[int]] | None:
        """The head over new rows (the target's hidden states `hidden` before its final norm, the tokens
        that followed them) and its k likeliest next columns after the last, in one native call
        (csrc/layer.cpp's head_step: the bits `forward` and `logits` give); their K/V are left
        pending in `cache`. (last row's state [1, d], columns best first), or None without the kernels."""
        ops = layer_ops()
        if ops is None or attention_op() is None or hidden.dtype != torch.float32:
            return None
        b = self.block
        cache.check_room(len(tokens))
        state, top = ops.head_step(
            hidden.contiguous(), target.norm.weight, target.norm.eps, target.embed.weight, tokens, self.fc.spec(),
            *b.native_weights(), cache.k, cache.v, cache.length, torch.view_as_real(target.rope[positions]),
            b.n_heads, b.n_kv, self.norm.weight, self.norm.eps, self.lm.spec(), k)
        return state, top.tolist()


def load_head(path: str | Path, target: Transformer, dtype: torch.dtype) -> DraftHead:
    """A head saved by `fastdecode train-head`, checked against the target's shape."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"draft head {path} not found (train one with `fastdecode train-head`)")
    cfg = target.cfg
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastdecode draft head (format {meta.get('format')!r}, want {FORMAT!r})")
    want = {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size}
    got = {k: int(meta.get(k, -1)) for k in want}
    if got != want:
        raise ValueError(f"draft head {path} was trained for a model of shape {got}; this model is {want}")
    # the head's layer has no biases whatever the target's have; fuse it as the target's own are
    cfg = replace(cfg, num_layers=1, attention_bias=False, tie_word_embeddings=True)
    head = DraftHead(cfg, state["vocab"])
    hf = {"model.layers.0." + k[len("layer."):]: v for k, v in state.items() if k.startswith("layer.")}
    hf.update({"model.embed_tokens.weight": target.embed.weight.detach(), "model.norm.weight": state["norm.weight"]})
    fused = fuse_hf_state(hf, cfg)
    weights = {"block." + k[len("blocks.0."):]: v for k, v in fused.items() if k.startswith("blocks.0.")}
    weights.update({"fc.weight": state["fc.weight"], "norm.weight": state["norm.weight"],
                    "lm.weight": target.embed.weight.detach()[head.vocab]})
    # matrices in `dtype`, norms fp32, as Transformer.load_hf_state stores them
    weights = {k: v.to(dtype if v.dim() == 2 else torch.float32) for k, v in weights.items()}
    head.load_state_dict(weights, strict=True, assign=True)
    if dtype == torch.bfloat16 and amx_bf16():
        pack_linears_amx(head)  # as build_model packs the target's: the AMX kernel, ~0.35 ms less a call here
    into_huge_pages(head)  # as the target's: its ~13 MB stream once a step
    return head.eval()


class HeadDrafter:
    def __init__(self, target: Transformer, head: DraftHead, depth: int = DEPTH) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.target, self.head, self.depth = target, head, depth
        self.vocab = head.vocab.tolist()  # the head's logit columns -> token ids
        cfg = target.cfg
        self.cache = KVCache(1, cfg.num_kv_heads, cfg.head_dim, target.max_len, target.kv_dtype)
        self.pending: tuple[torch.Tensor, list[int], int] | None = None  # (hidden rows, next tokens, first position)
        self.prompt_len = 0
        self.root_pos = -1  # the position of the last proposal's root
        self._prefill = False

    def begin(self, prompt_ids: list[int], request: DraftRequest | None = None) -> None:
        self.cache.truncate(0)
        self.pending = None
        self.prompt_len = len(prompt_ids)
        self._prefill = True  # the first propose reads the prefill's hidden states

    def end(self, output_ids: list[int]) -> None:
        return None

    @torch.inference_mode()
    def propose(self, context: list[int], budget: int) -> DraftTree:
        self.root_pos = len(context) - 1
        if self._prefill:  # the prefill's rows: the prompt's last `rows` positions
            self._prefill = False
            hidden = self.target.hidden
            if hidden is not None and 0 < hidden.shape[0] <= self.prompt_len == self.root_pos:
                first = self.prompt_len - hidden.shape[0]
                self.pending = (hidden, context[first + 1 :], first)
        pending, self.pending = self.pending, None
        if pending is None or budget <= 0:
            return DraftTree()
        hidden, tokens, first = pending
        if first + len(tokens) != self.root_pos:  # out of step with the context: nothing to go on
            return DraftTree()
        if self.cache.length + len(tokens) + self.depth * FRONTIER > self.cache.max_len:
            self.cache.truncate(0)  # the head's cache is full: its context starts again
        positions = slice(first, first + len(tokens))
        if min(self.depth, budget) == 1:  # one depth (the default): the root's likeliest children, best first
            k = min(TOP_K, budget, len(self.vocab))
            guess = self.head.first_guess(self.target, hidden, tokens, positions, self.cache, k)
            if guess is not None:
                self.cache.append(len(tokens))
                return DraftTree([self.vocab[i] for i in guess[1]], [-1] * len(guess[1]))
        states = self._run(self.target.norm(hidden), tokens, positions, None)
        self.cache.append(len(tokens))
        committed = self.cache.length
        try:
            return self._expand(states[-1:], budget)
        finally:
            self.cache.truncate(committed)

    def _run(self, feats: torch.Tensor, tokens: list[int], positions: slice | list[int],
             mask: torch.Tensor | None) -> torch.Tensor:
        embeds = self.target.embed.weight[tokens].float()
        rot = self.target.rope[positions]  # a slice of consecutive positions is a view
        self.cache.check_room(len(tokens))
        return self.head(feats, embeds, rot, self.cache, mask)

    def _expand(self, root_state: torch.Tensor, budget: int) -> DraftTree:
        """Grow the tree depth by depth from the guessed state of the root's position: every
        frontier node proposes its TOP_K likeliest children, the FRONTIER best new nodes (by path
        probability) are run through the head for the next depth, and the `budget` best nodes are kept."""
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        depths: list[int] = []
        column: dict[int, int] = {}  # a run node -> its column in the head's cache
        frontier, states = [-1], root_state  # nodes whose guessed states are `states`' rows; -1 = root
        committed = self.cache.length
        last = min(self.depth, budget)
        if last == 1:  # one depth (the default): the root's likeliest children, best first
            top = torch.topk(self.head.logits(states), min(TOP_K, budget, len(self.vocab))).indices[0].tolist()
            return DraftTree([self.vocab[i] for i in top], [-1] * len(top))
        for depth in range(1, last + 1):
            probs = torch.softmax(self.head.logits(states), -1)
            top_p, top_i = probs.topk(min(TOP_K, probs.shape[-1]), -1)
            ids = self.head.vocab[top_i].tolist()
            for node, ps, ts in zip(frontier, top_p.tolist(), ids):
                base = 1.0 if node < 0 else scores[node]
                for p, t in zip(ps, ts):
                    tokens.append(t)
                    parents.append(node)
                    scores.append(base * p)
                    depths.append(depth)
            if depth == last:
                break
            new = sorted((i for i in range(len(tokens)) if depths[i] == depth), key=lambda i: -scores[i])[:FRONTIER]
            new = [i for i in new if scores[i] >= MIN_SCORE]
            if not new:
                break
            # a node's row: its parent's guessed state and its own token, at its parent's position,
            # attending to the context and to its ancestors' rows
            start = self.cache.length
            mask = np.zeros((len(new), start + len(new)), dtype=bool)  # numpy: far fewer op calls
            mask[:, :committed] = True
            parent_rows = []
            for r, i in enumerate(new):
                mask[r, start + r] = True
                parent_rows.append(frontier.index(parents[i]))
                a = parents[i]
                while a >= 0:
                    mask[r, column[a]] = True
                    a = parents[a]
            states = self._run(states[parent_rows], [tokens[i] for i in new], [self.root_pos + depth - 1] * len(new),
                               torch.from_numpy(mask))
            self.cache.append(len(new))
            for r, i in enumerate(new):
                column[i] = start + r
            frontier = new
        order = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))[:budget]
        keep = sorted(order)  # a child's score never exceeds its parent's, so parents are kept
        remap = {old: new for new, old in enumerate(keep)}
        return DraftTree([tokens[i] for i in keep], [remap[parents[i]] if parents[i] >= 0 else -1 for i in keep])

    def update(self, step: StepResult) -> None:
        hidden = self.target.hidden
        if hidden is None or hidden.shape[0] != len(step.tree) + 1:
            self.pending = None  # the batched forward keeps no hidden states
            return
        self.pending = (hidden[step.accepted_rows], list(step.emitted), self.root_pos)


def head_drafter(env: DrafterEnv) -> HeadDrafter:
    head = env.draft_head()
    if head is None or env.model is None:
        raise ValueError("method 'head' needs a trained draft head: pass draft_head=PATH to LLM "
                         "(--draft-head PATH; train one with `fastdecode train-head`)")
    return HeadDrafter(env.model, head)


def save_head(path: str | Path, state: dict[str, torch.Tensor], vocab: torch.Tensor, cfg: ModelConfig) -> None:
    """Write a head in the format `load_head` reads: Hugging Face-style names (fc, layer.*, norm),
    the vocabulary subset as `vocab`, the target's shape in the metadata."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size}
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    tensors["vocab"] = vocab.long().contiguous()
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
