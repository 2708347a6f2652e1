"""Logits parity with transformers' own implementation on the same random weights (fp32)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastdecode import kv_cache
from fastdecode.kv_cache import KVCache, blocked_keys, key_rows, paired_values, value_rows
from fastdecode.model import build_model
from fastdecode.tree import DraftTree
from fastdecode.weights import load_checkpoint
from conftest import make_tiny_model

TOL = 1e-4
VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied-llama3-rope": (
        "llama",
        {"tie_word_embeddings": True, "rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}},
    ),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": None}),
}


def _pair(tmp_path: Path, variant: str):
    import transformers

    arch, overrides = VARIANTS[variant]
    folder = make_tiny_model(tmp_path / variant, arch, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    cfg, state, _ = load_checkpoint(str(folder))
    return hf, build_model(cfg, state, "float32", max_len=256)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_incremental_decode_match_transformers(tmp_path: Path, variant: str) -> None:
    hf, model = _pair(tmp_path, variant)
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]  # [40, vocab]
    cache = model.new_cache()
    out = model(ids[:30], torch.arange(30), cache)
    cache.append(30)
    assert (out - ref[:30]).abs().max() < TOL
    for i in range(30, 40):
        step = model(ids[i : i + 1], torch.tensor([i]), cache)
        cache.append(1)
        assert (step[0] - ref[i]).abs().max() < TOL, f"decode step at position {i}"


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_tree_mask_branch_logits_equal_running_each_branch_alone(tmp_path: Path, variant: str) -> None:
    hf, model = _pair(tmp_path, variant)
    prefix = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    tree = DraftTree()  # root -> a -> b ; root -> c -> d -> e ; a -> f
    a = tree.add(11, -1)
    tree.add(12, a)
    c = tree.add(13, -1)
    d = tree.add(14, c)
    tree.add(15, d)
    tree.add(16, a)
    root = 7
    cache = model.new_cache()
    model(torch.tensor(prefix), torch.arange(len(prefix)), cache)
    cache.append(len(prefix))
    rows = torch.tensor([root] + tree.tokens)
    mask = torch.ones(len(rows), len(prefix) + len(rows), dtype=torch.bool)
    mask[:, len(prefix):] = tree.ancestor_mask()
    logits = model(rows, len(prefix) + torch.tensor(tree.depths()), cache, mask)
    for path in tree.paths():
        seq = torch.tensor(prefix + [root] + path)
        with torch.no_grad():
            ref = hf(seq[None]).logits[0, len(prefix):]
        node_rows = _rows_of_path(tree, path)
        assert (logits[[0] + node_rows] - ref).abs().max() < TOL, f"branch {path}"


def _rows_of_path(tree: DraftTree, path: list[int]) -> list[int]:
    rows, parent = [], -1
    for token in path:
        node = next(i for i, (t, p) in enumerate(zip(tree.tokens, tree.parents)) if t == token and p == parent)
        rows.append(node + 1)
        parent = node
    return rows


def test_kv_cache_keep_compacts_accepted_rows_and_truncate_rolls_back(tmp_path: Path) -> None:
    hf, model = _pair(tmp_path, "llama")
    ids = torch.randint(0, 320, (10,), generator=torch.Generator().manual_seed(3)).tolist()
    cache = model.new_cache()
    model(torch.tensor(ids[:6]), torch.arange(6), cache)
    cache.append(6)
    # a chain drafted as a tree with a wrong sibling between the right tokens: keep rows 0, 2, 3
    tree = DraftTree([99, ids[7], ids[8]], [-1, -1, 1])
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[:, 6:] = tree.ancestor_mask()
    model(torch.tensor([ids[6]] + tree.tokens), 6 + torch.tensor(tree.depths()), cache, mask)
    cache.keep([0, 2, 3])
    assert cache.length == 9
    last = model(torch.tensor([ids[9]]), torch.tensor([9]), cache)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0, -1]
    assert (last[0] - ref).abs().max() < TOL
    cache.truncate(6)
    assert cache.length == 6
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(7)


@pytest.mark.parametrize("native", [True, False])
def test_blocked_bf16_keys_keep_and_write_like_rows(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 cache stores its keys in 16-slot blocks and its values in slot pairs (the AVX512-BF16
    core's layouts): writing
    pending rows, keeping an accepted path and reading the keys back as rows give what an fp32
    cache holds, rounded to bf16; its storage is whole blocks."""
    if not native:  # the torch moves keep() falls back on without the kernels
        monkeypatch.setattr(kv_cache, "layer_ops", lambda: None)
    elif kv_cache.layer_ops() is None:
        pytest.skip("no native kernels here: the torch moves are the other case")
    g = torch.Generator().manual_seed(5)
    caches = [KVCache(2, 2, 16, 40, dtype) for dtype in (torch.float32, torch.bfloat16)]
    assert caches[1].blocked and caches[1].k.shape[2] == 48 and not caches[0].blocked
    for step, (n, keep) in enumerate([(4, [0, 1, 2, 3]), (6, [0, 2, 5]), (20, [1, 4, 7, 16, 19])]):
        k, v = (torch.randn(2, 2, n, 16, generator=g).bfloat16().float() for _ in range(2))
        for cache in caches:
            for layer in range(2):
                keys, values = cache.write(layer, k[layer], v[layer])
                assert torch.equal(keys[:, cache.length :].float(), k[layer]), step
            cache.keep(keep)
    assert caches[0].length == caches[1].length == 12
    rows = caches[1].keys()
    assert torch.equal(rows[:, :, :12].float(), caches[0].keys()[:, :, :12])
    assert torch.equal(caches[1].values()[:, :, :12].float(), caches[0].values()[:, :, :12])
    block = rows[:, :, :16]  # slots 0-15 were all written (the rest of the storage is uninitialized)
    assert torch.equal(blocked_keys(block), caches[1].k[:, :, :16]) and torch.equal(key_rows(blocked_keys(block)), block)
    values = caches[1].values()[:, :, :16]
    assert torch.equal(paired_values(values), caches[1].v[:, :, :16]) and torch.equal(value_rows(paired_values(values)), values)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int4"])
def test_build_model_moves_every_weight_into_one_huge_page_mapping(
    tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_model copies the parameters and buffers into one mapping advised for transparent
    huge pages, starting on a 2 MB boundary: the same values, shapes and strides as the model
    built without it, a tied LM head still the embedding's own Parameter, and the same logits."""
    import fastdecode.model as model_mod

    folder = make_tiny_model(tmp_path / "m", "llama", tie_word_embeddings=True)
    cfg, state, _ = load_checkpoint(str(folder))
    model = build_model(cfg, state, dtype, max_len=64)
    with monkeypatch.context() as m:
        m.setattr(model_mod, "into_huge_pages", lambda model: None)
        plain = build_model(cfg, state, dtype, max_len=64)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    reference = dict(plain.named_parameters()) | dict(plain.named_buffers())
    assert tensors.keys() == reference.keys() and len(tensors) > 5
    for name, t in tensors.items():
        want = reference[name]
        assert t.dtype == want.dtype and t.shape == want.shape and t.stride() == want.stride(), name
        assert torch.equal(t, want), name
    starts = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(starts) == 1  # one mapping
    assert starts.pop() % model_mod.HUGE_PAGE == 0
    if dtype == "float32":  # tied and not repacked: one Parameter
        assert model.lm_head.weight is model.embed.weight
    ids = torch.tensor([3, 17, 5, 99, 42])
    assert torch.equal(model(ids, torch.arange(5), model.new_cache()), plain(ids, torch.arange(5), plain.new_cache()))


def test_build_model_keeps_ordinary_pages_where_the_kernel_refuses_huge_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel without transparent huge pages answers madvise(MADV_HUGEPAGE) with EINVAL: the
    model still loads, its weights in the one mapping, with the same logits."""
    import mmap

    calls = []

    class Refusing(mmap.mmap):
        def madvise(self, *args):
            calls.append(args)
            raise OSError(22, "Invalid argument")

    folder = make_tiny_model(tmp_path / "m", "llama")
    cfg, state, _ = load_checkpoint(str(folder))
    plain = build_model(cfg, state, "float32", max_len=64)
    monkeypatch.setattr(mmap, "mmap", Refusing)
    model = build_model(cfg, state, "float32", max_len=64)
    assert calls  # the advice was asked for and refused
    ids = torch.tensor([3, 17, 5, 99, 42])
    assert torch.equal(model(ids, torch.arange(5), model.new_cache()), plain(ids, torch.arange(5), plain.new_cache()))
