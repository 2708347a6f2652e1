"""With the native kernels a token's logits do not depend on how many tokens share its forward:
a draft-tree forward gives, bit for bit, what one-token AR forwards give. This is what makes every
method's greedy output identical to AR's in bf16 / int8 / int4 too, not just in fp32."""
from __future__ import annotations

import pytest
import torch

from fastdecode import LLM, SamplingParams, kernels
from fastdecode.drafters import METHODS


@pytest.fixture(scope="module", autouse=True)
def require_kernels() -> None:
    if not kernels.cpu_supports_avx2_fma():
        pytest.skip("this CPU lacks AVX2/FMA, which the kernels require")
    assert kernels.attention_op() is not None, "the fastdecode kernels failed to build on an AVX2+FMA CPU"


def _prefilled(model, prompt: torch.Tensor):
    cache = model.new_cache()
    model(prompt, torch.arange(len(prompt)), cache)
    cache.append(len(prompt))
    return cache


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_tree_forward_equals_one_token_forwards_bitwise(tiny_llama_dir, dtype: str) -> None:
    model = LLM(str(tiny_llama_dir), dtype=dtype).model
    prompt = torch.tensor([72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 32, 72, 101])
    chain = [5, 77, 300, 12]
    cache = _prefilled(model, prompt)
    ar = []
    for token in chain:
        ar.append(model(torch.tensor([token]), torch.tensor([cache.length]), cache)[0])
        cache.append(1)
    # the same chain inside a tree with siblings: nodes (token, parent)
    nodes = [(chain[0], -1), (99, 0), (chain[1], 0), (42, 2), (chain[2], 2), (chain[3], 4)]
    on_chain = [0, 2, 4, 5]
    cache = _prefilled(model, prompt)
    length, n = cache.length, len(nodes)
    mask = torch.zeros(n, length + n, dtype=torch.bool)
    mask[:, :length] = True
    depth = []
    for i, (_, parent) in enumerate(nodes):
        mask[i, length + i] = True
        if parent >= 0:
            mask[i, length:] |= mask[parent, length:]
        depth.append(0 if parent < 0 else depth[parent] + 1)
    logits = model(torch.tensor([t for t, _ in nodes]), length + torch.tensor(depth), cache, mask)
    for step, row in enumerate(on_chain):
        assert torch.equal(logits[row], ar[step]), f"{dtype}: chain token {step} differs from AR"


@pytest.mark.parametrize("dtype", ["bfloat16", "int4"])
def test_every_method_equals_ar_in_low_precision(tiny_llama_dir, tiny_head, dtype: str) -> None:
    llm = LLM(str(tiny_llama_dir), dtype=dtype, draft_head=str(tiny_head[3]))
    params = SamplingParams(max_tokens=40, temperature=0)
    prompts = ["a b c d e f g a b c d e f g a b c", "for i in range(10):\n    print(i)\nfor i in", "the the the",
               "Shopping list:\n- apples\n- bread\n- milk\n- apples\n- bread\n-"]
    for prompt in prompts:
        want = llm.generate(prompt, params, method="ar")[0].token_ids
        for method in METHODS:
            assert llm.generate(prompt, params, method=method)[0].token_ids == want, (dtype, method, prompt)
