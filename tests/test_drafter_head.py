"""The `head` drafter (EAGLE-style draft head) and its training from the model alone (headtrain.py).

The method-wide lossless tests (test_lossless, test_sampling_lossless, test_server_batch) run it
too, with the head the `tiny_llm` fixture trains (conftest.tiny_head). Here: the pieces.
"""
from __future__ import annotations

import pytest
import torch

from fastdecode import LLM, SamplingParams
from fastdecode.drafters import head as head_module
from fastdecode.drafters.head import HeadDrafter, load_head, save_head
from fastdecode.headtrain import Corpus, TrainHead, accuracy, features, make_corpus, train, turn_ids


def test_the_loaded_head_computes_what_the_trained_one_does(tiny_llm, tmp_path) -> None:
    """The native head (fused q/k/v, interleaved RoPE rows, the layer kernel, a KV cache fed
    row by row) must give the training module's numbers."""
    cfg = tiny_llm.config
    torch.manual_seed(1)
    head = TrainHead(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                     cfg.rms_norm_eps, cfg.rope_theta)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "head.safetensors"
    vocab = torch.arange(0, cfg.vocab_size, 3)
    save_head(path, head.hf_state(), vocab, cfg)
    native = load_head(path, tiny_llm.model, torch.float32)
    assert torch.equal(native.vocab, vocab)
    T, d = 9, cfg.hidden_size
    feats, embeds = torch.randn(T, d), torch.randn(T, d)
    want = head(feats[None], embeds[None])[0].detach()
    cache = tiny_llm.model.new_cache()
    got = []
    for j in range(T):  # one row at a time through the cache, as drafting runs it
        rot = tiny_llm.model.rope[torch.tensor([j])]
        got.append(native(feats[j : j + 1], embeds[j : j + 1], rot, cache, None))
        cache.append(1)
    assert torch.allclose(torch.cat(got), want, atol=1e-4)
    assert torch.allclose(native.logits(want), want @ tiny_llm.model.embed.weight[vocab].T, atol=1e-4)


def test_a_head_file_for_another_model_is_refused(tiny_llm, tmp_path) -> None:
    cfg = tiny_llm.config
    head = TrainHead(cfg.hidden_size * 2, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim * 2, cfg.intermediate_size,
                     cfg.rms_norm_eps, cfg.rope_theta)
    path = tmp_path / "other.safetensors"
    other = type(cfg)(**{**cfg.__dict__, "hidden_size": cfg.hidden_size * 2})
    save_head(path, head.hf_state(), torch.arange(10), other)
    with pytest.raises(ValueError, match="trained for a model of shape"):
        load_head(path, tiny_llm.model, torch.float32)
    with pytest.raises(ValueError, match="not found"):
        load_head(tmp_path / "missing.safetensors", tiny_llm.model, torch.float32)


def test_method_head_without_a_head_names_the_option(tiny_llama_dir, tmp_path) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="float32")
    with pytest.raises(ValueError, match="draft_head=PATH"):
        llm.generate("hello", SamplingParams(max_tokens=4, temperature=0), method="head")
    with pytest.raises(ValueError, match="not found"):  # at construction, whatever the method used later
        LLM(str(tiny_llama_dir), dtype="float32", draft_head=str(tmp_path / "missing.safetensors"))


def test_magpie_turn_ids_frame_a_user_message(tiny_llm) -> None:
    before, after = turn_ids(tiny_llm)
    msg = list(tiny_llm.tokenizer.encode("hi there", add_special_tokens=False))
    assert before + msg + after == tiny_llm.apply_chat_template([{"role": "user", "content": "hi there"}])


def test_trained_head_beats_chance_and_its_drafts_get_accepted(tiny_llm, tiny_head) -> None:
    """The fixture's head was trained for a few seconds on the tiny model's own answers: on new
    answers it must guess the token after next far above chance (1 / 320; measured 0.07-0.15 over
    seeds and thread counts), and drafting with it must take fewer steps than AR, with AR's exact output."""
    head, corpus, sub, _ = tiny_head
    fresh = make_corpus(tiny_llm, seconds=0, batch=16, answer_tokens=48, seed=99, log=lambda _: None)
    acc = accuracy(head, fresh, features(tiny_llm.model, fresh.seqs), tiny_llm.model.embed.weight.detach(), sub)
    assert acc > 0.04
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    prompts = [seq[:start] for seq, start in zip(fresh.seqs, fresh.starts)]
    ar = tiny_llm.generate(prompts, params, method="ar")
    out = tiny_llm.generate(prompts, params, method="head")
    assert [o.token_ids for o in out] == [o.token_ids for o in ar]
    assert sum(o.metrics.steps for o in out) < sum(o.metrics.steps for o in ar)


def test_auto_takes_the_draft_head_as_a_member_and_accepts_its_nodes(tiny_llama_dir, tiny_llm, monkeypatch) -> None:
    """An LLM given a draft head drafts with it inside `auto` too (and only then), with AR's output."""
    assert "head" not in LLM(str(tiny_llama_dir), dtype="float32").new_drafter("auto").members
    auto = tiny_llm.new_drafter("auto")
    assert list(auto.members) == ["suffix", "aded", "recycling", "head"]
    fresh = make_corpus(tiny_llm, seconds=0, batch=8, answer_tokens=32, seed=7, log=lambda _: None)
    prompts = [seq[:start] for seq, start in zip(fresh.seqs, fresh.starts)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in tiny_llm.generate(prompts, params, method="ar")]
    monkeypatch.setattr(tiny_llm, "drafter", lambda method: auto)  # this one, to read its statistics after
    got = [o.token_ids for o in tiny_llm.generate(prompts, params, method="auto")]
    assert got == want
    head_hits = sum(hits for (member, *_), (hits, _) in auto.stats.items() if member == "head")
    assert head_hits > 0


def test_the_head_restarts_its_context_after_a_step_without_hidden_states(tiny_llm) -> None:
    """A batched forward keeps no hidden states: the drafter then proposes nothing for a step and
    picks the context up again after the next plain one, never misaligned."""
    drafter = tiny_llm.new_drafter("head")
    assert isinstance(drafter, HeadDrafter)
    ids = tiny_llm.tokenizer.encode("the cat sat on the mat")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    want = tiny_llm.generate(ids, params, method="ar")[0].token_ids
    model = tiny_llm.model
    real = model.forward
    calls = {"n": 0}

    def forward(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            model.hidden = None
        return out

    model.forward = forward
    try:
        tiny_llm._drafters["head"] = drafter
        got = tiny_llm.generate(ids, params, method="head")[0]
    finally:
        del model.forward
        tiny_llm._drafters.pop("head")
    assert got.token_ids == want
    assert got.metrics.drafted > 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_deeper_head_trees_keep_ar_output(tiny_llm, monkeypatch, temperature: float) -> None:
    """depth 3: the head runs again over its own guessed states (tree rows with a mask over the
    head's cache); trees reach depth 3, and the output is `ar`'s, greedy and seeded sampling alike.
    Every frontier node is expanded and kept (MIN_SCORE 0, a budget above the 36 nodes)."""
    monkeypatch.setattr(head_module, "MIN_SCORE", 0.0)
    monkeypatch.setattr(tiny_llm, "draft_budget", 40)
    drafter = HeadDrafter(tiny_llm.model, tiny_llm.load_draft_head(), depth=3)
    depths = []
    propose = drafter.propose

    def spy(context, budget):
        tree = propose(context, budget)
        depths.append(max(tree.depths()))
        return tree

    drafter.propose = spy
    params = SamplingParams(max_tokens=40, temperature=temperature, seed=5, ignore_eos=True)
    prompts = ["the cat sat on the mat. the cat", "hello hello hello", "1 2 3 4 5 6 7 8"]
    want = [o.token_ids for o in tiny_llm.generate(prompts, params, method="ar")]
    tiny_llm._drafters["head"] = drafter
    try:
        got = [o.token_ids for o in tiny_llm.generate(prompts, params, method="head")]
    finally:
        tiny_llm._drafters.pop("head")
    assert got == want
    assert max(depths) == 3
    with pytest.raises(ValueError, match="depth=0"):
        HeadDrafter(tiny_llm.model, tiny_llm.load_draft_head(), depth=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@torch.inference_mode()
def test_the_one_call_head_step_gives_the_module_path_bits(tiny_llama_dir, tiny_head, dtype: str) -> None:
    """DraftHead.first_guess (csrc/layer.cpp's head_step, what `propose` runs at one depth) must give
    bit for bit the state, K/V and top columns that the module path (target norm, embedding, `forward`,
    `logits`, topk) gives, over a cache holding earlier rows."""
    llm = LLM(str(tiny_llama_dir), dtype=dtype, draft_head=str(tiny_head[3]))
    model, head = llm.model, llm.load_draft_head()
    ids = llm.tokenizer.encode("the cat sat on the mat and then the dog came by")
    n, cached = len(ids), 5
    model(torch.tensor(ids), torch.arange(n), model.new_cache())
    hidden = model.hidden.clone()
    tokens = ids[1:] + [ids[0]]

    def cache_with_earlier_rows():
        cache = HeadDrafter(model, head).cache
        cache.k.zero_()
        cache.v.zero_()
        head(model.norm(hidden[:cached]), model.embed.weight[tokens[:cached]].float(), model.rope[:cached], cache, None)
        cache.append(cached)
        return cache

    fused, plain = cache_with_earlier_rows(), cache_with_earlier_rows()
    got = head.first_guess(model, hidden[cached:], tokens[cached:], slice(cached, n), fused, 4)
    assert got is not None  # the kernels are built wherever the tests run
    states = head(model.norm(hidden[cached:]), model.embed.weight[tokens[cached:]].float(), model.rope[cached:n], plain,
                  None)
    logits = head.logits(states[-1:])[0]
    assert torch.equal(got[0], states[-1:])
    assert torch.equal(fused.k, plain.k) and torch.equal(fused.v, plain.v)
    values = logits.tolist()
    want = sorted(range(len(values)), key=lambda j: (-values[j], j))[:4]
    assert got[1] == want
