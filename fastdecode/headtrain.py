"""Training a `head` draft head (see drafters/head.py) from the target model alone.

No corpus is needed: the target writes its own (Magpie, Xu et al. 2024). Given only the chat
template up to a user turn, an instruction-tuned model samples a plausible user message; its
greedy answer to that message is then exactly the text the head must learn to predict. Steps:

1. `make_corpus`: user messages sampled at temperature 1 (top-p 0.95), then greedy answers, many
   sequences at a time through `Transformer.forward_batch`;
2. `features`: one forward per sequence, keeping the final hidden states (after the norm);
3. `train`: EAGLE's objective: the head's input at j is (state at j, embedding of token j + 1);
   its output is fitted to the state at j + 1 (smooth L1) and, through the target's LM head cut to
   the corpus's most frequent tokens, to token j + 2 (cross entropy, weight 0.1). States get a
   little noise, so the head tolerates its own guesses when it drafts several tokens deep.

The loss covers answer positions only; the user message is context.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fastdecode.model import Segment
from fastdecode.sampling import Sampler, SamplingParams

MARK = "\u2063fastdecode\u2063"  # a user message no tokenizer merges with the template around it


@dataclass
class Corpus:
    seqs: list[list[int]]  # chat template + user message + answer
    starts: list[int]  # where each answer starts

    def split(self, last: int) -> tuple["Corpus", "Corpus"]:
        """(all but the last `last` sequences, the last `last`)."""
        cut = len(self.seqs) - last
        return Corpus(self.seqs[:cut], self.starts[:cut]), Corpus(self.seqs[cut:], self.starts[cut:])


def save_corpus(corpus: Corpus, path: str) -> None:
    with open(path, "w") as f:
        for ids, start in zip(corpus.seqs, corpus.starts):
            f.write(json.dumps({"ids": ids, "start": start}) + "\n")


def load_corpus(path: str, vocab_size: int) -> Corpus:
    """A corpus `save_corpus` wrote (or any file of the same rows), checked against the vocabulary."""
    corpus = Corpus([], [])
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                ids, start = [int(t) for t in row["ids"]], int(row["start"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path} line {n}: want {{\"ids\": [token ids], \"start\": answer start}} ({exc})") from exc
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{path} line {n}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
            if not 0 < start < len(ids):
                raise ValueError(f"{path} line {n}: start={start} must be in [1, {len(ids) - 1}] (the answer's first index)")
            corpus.seqs.append(ids)
            corpus.starts.append(start)
    if not corpus.seqs:
        raise ValueError(f"corpus {path} is empty")
    return corpus


def turn_ids(llm) -> tuple[list[int], list[int]]:
    """The chat template's ids before a user message and between it and the answer."""
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False,
                                             add_generation_prompt=True)
    if text.count(MARK) != 1:
        raise ValueError("the chat template must show the user's message once")
    before, after = text.split(MARK)
    enc = llm.encode
    if enc(before) + enc(MARK) + enc(after) != llm.apply_chat_template([{"role": "user", "content": MARK}]):
        raise ValueError("the chat template's pieces do not tokenize apart; Magpie prompts need them to")
    return enc(before), enc(after)


@torch.inference_mode()
def _decode(model, prompts: list[list[int]], max_new: int, samplers: list[Sampler], stop: set[int]) -> list[list[int]]:
    """Continue every prompt at once, each with its own sampler."""
    caches = [model.new_cache() for _ in prompts]
    logits = []
    for cache, p in zip(caches, prompts):
        logits.append(model(torch.tensor(p), torch.arange(len(p)), cache, last_only=True)[0])
        cache.append(len(p))
    outs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    while live:
        for i, lg in zip(live, logits):
            token = samplers[i].sample(lg)
            samplers[i].accept(token)
            outs[i].append(token)
        live = [i for i in live if outs[i][-1] not in stop and len(outs[i]) < max_new
                and caches[i].length + 1 < caches[i].max_len]
        segs = [Segment(torch.tensor(outs[i][-1:]), torch.tensor([caches[i].length]), caches[i]) for i in live]
        logits = [lg[0] for lg in model.forward_batch(segs)]
        for i in live:
            caches[i].append(1)
    return outs


def make_corpus(llm, seconds: float, batch: int = 64, answer_tokens: int = 256, seed: int = 0,
                log: Callable[[str], None] = print) -> Corpus:
    """Sample user messages and the model's greedy answers: batches of `batch` until `seconds`
    have passed (at least one batch)."""
    before, after = turn_ids(llm)
    end_turn = after[0]
    stop = set(llm.eos_ids)
    vocab = llm.config.vocab_size
    user_params = SamplingParams(temperature=1.0, top_p=0.95)
    drawn = 0
    corpus = Corpus([], [])
    t0, tokens = time.time(), 0
    while not corpus.seqs or time.time() - t0 < seconds:
        first = seed * 1_000_000 + drawn  # every user message its own seed
        samplers = [Sampler(replace(user_params, seed=first + i), before, vocab) for i in range(batch)]
        drawn += batch
        users = _decode(llm.model, [before] * batch, 96, samplers, {end_turn} | stop)
        users = [u[:-1] if u[-1] in stop | {end_turn} else u for u in users]
        users = [u for u in users if len(u) >= 4]
        prompts = [before + u + after for u in users]
        greedy = [Sampler(SamplingParams(temperature=0.0), p, vocab) for p in prompts]
        for p, a in zip(prompts, _decode(llm.model, prompts, answer_tokens, greedy, stop)):
            corpus.seqs.append(p + a)
            corpus.starts.append(len(p))
            tokens += len(a)
        log(f"corpus: {len(corpus.seqs)} answers, {tokens} tokens, {time.time() - t0:.0f} s")
    return corpus


@torch.inference_mode()
def features(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    """The target's final hidden states (after the norm) at every position, bf16."""
    cache = model.new_cache()
    out = []
    for ids in seqs:
        cache.truncate(0)
        model(torch.tensor(ids), torch.arange(len(ids)), cache, last_only=True)
        out.append(model.norm(model.hidden).to(torch.bfloat16))
    return out


class TrainHead(nn.Module):
    """The head in training form: Hugging Face-style names and rotate-half RoPE, as saved."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float,
                 theta: float) -> None:
        super().__init__()
        self.h, self.kv, self.hd, self.eps, self.theta = heads, kv_heads, head_dim, eps, theta
        lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
        self.fc = lin(2 * hidden, hidden)
        self.q_proj, self.k_proj = lin(hidden, heads * head_dim), lin(hidden, kv_heads * head_dim)
        self.v_proj, self.o_proj = lin(hidden, kv_heads * head_dim), lin(heads * head_dim, hidden)
        self.gate_proj, self.up_proj = lin(hidden, intermediate), lin(hidden, intermediate)
        self.down_proj = lin(intermediate, hidden)
        self.input_layernorm = nn.Parameter(torch.ones(hidden))
        self.post_attention_layernorm = nn.Parameter(torch.ones(hidden))
        self.norm = nn.Parameter(torch.ones(hidden))

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        d = self.hd
        inv = self.theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
        ang = pos[:, None].float() * inv
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    def forward(self, feats: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """[B, T, d] states and next-token embeddings -> [B, T, d] guessed next states (causal)."""
        B, T, _ = feats.shape
        norm = lambda x, w: F.rms_norm(x.float(), w.shape, w, self.eps)  # noqa: E731
        x = self.fc(torch.cat([feats, embeds], -1))
        h = norm(x, self.input_layernorm)
        pos = torch.arange(T)
        q = self._rope(self.q_proj(h).view(B, T, self.h, self.hd).transpose(1, 2), pos)
        k = self._rope(self.k_proj(h).view(B, T, self.kv, self.hd).transpose(1, 2), pos)
        v = self.v_proj(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        k, v = (t.repeat_interleave(self.h // self.kv, 1) for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, self.h * self.hd))
        h = norm(x, self.post_attention_layernorm)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return norm(x, self.norm)

    def hf_state(self) -> dict[str, torch.Tensor]:
        a, m = "layer.self_attn.", "layer.mlp."
        return {
            "fc.weight": self.fc.weight, a + "q_proj.weight": self.q_proj.weight, a + "k_proj.weight": self.k_proj.weight,
            a + "v_proj.weight": self.v_proj.weight, a + "o_proj.weight": self.o_proj.weight,
            m + "gate_proj.weight": self.gate_proj.weight, m + "up_proj.weight": self.up_proj.weight,
            m + "down_proj.weight": self.down_proj.weight, "layer.input_layernorm.weight": self.input_layernorm,
            "layer.post_attention_layernorm.weight": self.post_attention_layernorm, "norm.weight": self.norm,
        }


def vocab_subset(corpus: Corpus, vocab_size: int, size: int) -> torch.Tensor:
    """The `size` most frequent answer tokens (the head's vocabulary), in id order."""
    counts = torch.zeros(vocab_size)
    for ids, start in zip(corpus.seqs, corpus.starts):
        counts += torch.bincount(torch.tensor(ids[start:]), minlength=vocab_size).float()
    return counts.argsort(descending=True)[: min(size, vocab_size)].sort().values


def _batch(corpus: Corpus, feats: list[torch.Tensor], idx: list[int], embed: torch.Tensor, remap: torch.Tensor):
    """Inputs (state j, embedding of token j + 1), targets (state j + 1, token j + 2), loss weights."""
    T = max(len(corpus.seqs[i]) for i in idx) - 1
    B, d = len(idx), embed.shape[1]
    f, e, ft = torch.zeros(B, T, d), torch.zeros(B, T, d), torch.zeros(B, T, d)
    y = torch.full((B, T), -100, dtype=torch.long)
    w = torch.zeros(B, T)
    for b, i in enumerate(idx):
        ids, fe, start = torch.tensor(corpus.seqs[i]), feats[i].float(), corpus.starts[i]
        n = len(ids) - 1
        f[b, :n], e[b, :n], ft[b, :n] = fe[:n], embed[ids[1:]].float(), fe[1:]
        first = max(start - 2, 0)  # the first row whose target token is in the answer
        y[b, first : n - 1] = remap[ids[first + 2 :]]
        w[b, first:n] = 1.0
    return f, e, ft, y, w


def train(llm, corpus: Corpus, feats: list[torch.Tensor], epochs: int = 6, vocab: int = 4096, batch: int = 8,
          lr: float = 2e-3, noise: float = 0.05, seed: int = 0, log: Callable[[str], None] = print,
          ) -> tuple[TrainHead, torch.Tensor]:
    """Fit a head to the corpus; returns it and its vocabulary subset."""
    cfg = llm.config
    torch.manual_seed(seed)
    rng = random.Random(seed)
    sub = vocab_subset(corpus, cfg.vocab_size, vocab)
    remap = torch.full((cfg.vocab_size,), -100, dtype=torch.long)
    remap[sub] = torch.arange(len(sub))
    embed = llm.model.embed.weight.detach()
    lm = embed[sub].to(torch.bfloat16)
    head = TrainHead(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                     cfg.rms_norm_eps, cfg.rope_theta)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    order = list(range(len(corpus.seqs)))
    steps = max(1, epochs * (len(order) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps + 1, pct_start=0.05)
    t0, step = time.time(), 0
    for epoch in range(epochs):
        rng.shuffle(order)
        for j in range(0, len(order) - batch + 1, batch):
            f, e, ft, y, w = _batch(corpus, feats, order[j : j + batch], embed, remap)
            f = f + torch.randn_like(f) * noise * f.std()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = head(f, e)
                logits = pred @ lm.T
            reg = (F.smooth_l1_loss(pred.float(), ft, reduction="none").mean(-1) * w).sum() / w.sum().clamp(min=1)
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
            loss = reg + 0.1 * (ce if not math.isnan(ce.item()) else 0.0)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log(f"epoch {epoch} step {step}/{steps}: state loss {reg.item():.4f}, token loss {ce.item():.3f}, "
                    f"{time.time() - t0:.0f} s")
    return head.eval(), sub


@torch.inference_mode()
def accuracy(head: TrainHead, corpus: Corpus, feats: list[torch.Tensor], embed: torch.Tensor,
             sub: torch.Tensor) -> float:
    """How often the head's top token for j + 2 is the answer's, over answer positions."""
    lm = embed[sub].float()
    hit = total = 0
    for ids, fe, start in zip(corpus.seqs, feats, corpus.starts):
        ids_t = torch.tensor(ids)
        pred = head(fe[None, :-1].float(), embed[ids_t[1:]].float()[None])[0]
        guess = sub[(pred @ lm.T).argmax(-1)]
        first = max(start - 2, 0)
        right = guess[first : len(ids) - 2] == ids_t[first + 2 :]
        hit += int(right.sum())
        total += right.numel()
    return hit / max(total, 1)
