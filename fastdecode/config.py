"""ModelConfig: the shape of a Llama-family model, read from config.json or GGUF metadata.

One dataclass for llama, mistral and qwen2: they differ only in whether q/k/v carry a bias,
how RoPE is scaled, and whether the LM head is tied to the embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

_HF_ARCH_NAMES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint is not a Llama-family model this runtime implements."""

    def __init__(self, architecture: str) -> None:
        super().__init__(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(self.architecture)
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dictionary."""
        arch = cfg.get("model_type") or ""
        if arch not in SUPPORTED_ARCHITECTURES:
            names = cfg.get("architectures") or []
            arch = next((_HF_ARCH_NAMES[n] for n in names if n in _HF_ARCH_NAMES), arch or str(names))
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=_hf_rope_theta(cfg),
            rope_scaling=_hf_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], has_output_weight: bool) -> "ModelConfig":
        """Build from GGUF key/value metadata (`general.architecture` names the prefix)."""
        arch = meta.get("general.architecture", "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(arch)
        p = arch + "."
        num_heads = int(meta[p + "attention.head_count"])
        hidden = int(meta[p + "embedding_length"])
        scaling = None
        if meta.get(p + "rope.scaling.type") == "llama3" or p + "rope.scaling.factor" in meta:
            scaling = {
                "rope_type": meta.get(p + "rope.scaling.type", "linear"),
                "factor": float(meta.get(p + "rope.scaling.factor", 1.0)),
                "original_max_position_embeddings": int(
                    meta.get(p + "rope.scaling.original_context_length", meta[p + "context_length"])
                ),
            }
        eos = meta.get("tokenizer.ggml.eos_token_id")
        vocab = meta.get(p + "vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(meta[p + "feed_forward_length"]),
            num_layers=int(meta[p + "block_count"]),
            num_heads=num_heads,
            num_kv_heads=int(meta.get(p + "attention.head_count_kv", num_heads)),
            head_dim=int(meta.get(p + "attention.key_length", hidden // num_heads)),
            rms_norm_eps=float(meta[p + "attention.layer_norm_rms_epsilon"]),
            rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(meta[p + "context_length"]),
            tie_word_embeddings=not has_output_weight,
            attention_bias=arch == "qwen2",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [int(eos)],
        )


def _hf_rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _hf_rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return None if kind == "default" else dict(scaling, rope_type=kind)
