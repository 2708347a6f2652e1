"""Shared fixtures: tiny random Llama-family checkpoints with a byte-level tokenizer, built in
seconds in a temp folder, and the real default model (loaded once per session)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + 3 specials (ids 256..258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random tiny `arch` model (transformers' own class) plus the byte tokenizer to `folder`."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    kwargs = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        eos_token_id=258, bos_token_id=256,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # larger weights than the init gives make sharper, less uniform logits
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(str(folder))
    byte_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_head(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A `head` draft head trained for a few seconds on the tiny model's own answers (headtrain.py):
    (the training module, its corpus, its vocabulary, the saved file)."""
    from fastdecode import LLM
    from fastdecode.drafters.head import save_head
    from fastdecode.headtrain import features, make_corpus, train

    llm = LLM(str(tiny_llama_dir), dtype="float32")
    corpus = make_corpus(llm, seconds=0, batch=64, answer_tokens=64, log=lambda _: None)
    head, sub = train(llm, corpus, features(llm.model, corpus.seqs), epochs=30, vocab=llm.config.vocab_size,
                      lr=1e-2, log=lambda _: None)
    path = tmp_path_factory.mktemp("head") / "head.safetensors"
    save_head(path, head.hf_state(), sub, llm.config)
    return head, corpus, sub, path


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir: Path, tiny_head):
    from fastdecode import LLM

    llm = LLM(str(tiny_llama_dir), dtype="float32", draft_head=str(tiny_head[3]))
    force_model_drafting(llm)
    return llm


def force_model_drafting(llm) -> None:
    """Make `llm`'s model-based drafters always draft their whole budget. On a 2-layer random model
    no draft pays for itself, so the adaptive ones rightly stop drafting, and the method-wide
    lossless tests would then check nothing for them. `layerskip` runs layer 1 only (its drafts
    match more often than layer 0's); `draft` is the target itself as a separate draft model (its
    own KV cache, drafts nearly always right)."""
    from fastdecode.drafters.model import DraftModel, SkipLayers

    plain = llm.new_drafter

    def new_drafter(method: str):
        if method == "layerskip":
            return SkipLayers(llm.model, llm.forward_cost, [(1,)], adaptive=False)
        if method == "draft":
            return DraftModel(llm.model, llm.forward_cost, adaptive=False)
        return plain(method)

    llm.new_drafter = new_drafter


@pytest.fixture(scope="session")
def default_llm_fp32():
    from fastdecode import LLM

    return LLM(dtype="float32", max_model_len=2048)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
