"""Preallocated KV storage for one sequence.

Layout: `k[layer, kv_head, slot, head_dim]` (same for `v`), allocated once up to `max_len`; a
bf16 cache's keys are blocked by 16 slots and its values paired instead (`blocked_keys`,
`paired_values`; `keys()` and `values()` give them as rows).
`length` counts committed slots. A forward writes its n new entries into the *pending* slots
`[length, length + n)` without committing them; the engine then either commits them all
(`append(n)`: prefill, plain decoding) or keeps only the accepted draft path (`keep(indices)`),
which moves the chosen pending entries into place. Rejected entries are simply overwritten
by the next forward, as in gpt-fast's static cache.

Prefix reuse: `tokens` lists what the committed slots hold, as far as the owner has told
(`remember`); a new sequence keeps the slots of the longest prefix it shares with them (`reuse`)
and prefills only the rest. That is exact only where a slot's numbers depend on nothing but the
tokens up to it, whatever else ran in the same forward (`Transformer.exact_rows`).
"""
from __future__ import annotations

import torch

from fastdecode.kernels import layer_ops


class ContextLengthError(ValueError):
    """A sequence would not fit in the preallocated cache."""


KEY_BLOCK = 16  # slots per block of a bf16 cache's keys (csrc/kernels.h: key_offset)
VALUE_BLOCK = 2  # and of its values (value_offset)


def _blocked(t: torch.Tensor, block: int, unit: int) -> torch.Tensor:
    """Rows `[..., slots, hd]` -> blocks of `block` slots, `unit` features of each slot side by side."""
    *lead, slots, hd = t.shape
    return t.reshape(*lead, slots // block, block, hd // unit, unit).transpose(-3, -2).reshape(t.shape)


def _rows(t: torch.Tensor, block: int, unit: int) -> torch.Tensor:
    *lead, slots, hd = t.shape
    return t.reshape(*lead, slots // block, hd // unit, block, unit).transpose(-3, -2).reshape(t.shape)


def blocked_keys(k: torch.Tensor) -> torch.Tensor:
    """Keys `[..., slots, hd]` in slot rows -> the bf16 cache's layout (a copy of the same shape): per
    block of 16 slots, feature pair (2w, 2w + 1) of its 16 slots side by side, pairs outermost."""
    return _blocked(k, KEY_BLOCK, 2)


def key_rows(k: torch.Tensor) -> torch.Tensor:
    """The inverse of `blocked_keys`: a bf16 cache's keys as `[..., slots, hd]` rows (a copy)."""
    return _rows(k, KEY_BLOCK, 2)


def paired_values(v: torch.Tensor) -> torch.Tensor:
    """Values `[..., slots, hd]` in slot rows -> the bf16 cache's layout: slots 2m and 2m + 1 side by
    side, feature by feature."""
    return _blocked(v, VALUE_BLOCK, 1)


def value_rows(v: torch.Tensor) -> torch.Tensor:
    """The inverse of `paired_values` (a copy)."""
    return _rows(v, VALUE_BLOCK, 1)


def _move(t: torch.Tensor, block: int, unit: int, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy slots `src` to slots `dst` of a blocked cache tensor `[layers, heads, slots, hd]`."""
    layers, heads, slots, hd = t.shape
    tb = t.view(layers, heads, slots // block, hd // unit, block, unit)  # slot s: (s // block, :, s % block)
    tb[:, :, dst // block, :, dst % block] = tb[:, :, src // block, :, src % block]


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> None:
        # a bf16 cache's keys are blocked and its values paired (blocked_keys, paired_values: the
        # AVX512-BF16 attention core's vdpbf16ps layouts): its storage has whole blocks
        self.blocked = dtype == torch.bfloat16
        slots = -(-max_len // KEY_BLOCK) * KEY_BLOCK if self.blocked else max_len
        shape = (num_layers, num_kv_heads, slots, head_dim)
        # uninitialized: only written slots are ever read, and untouched pages cost no memory
        # (zeroing SmolLM2's 8192-slot cache took ~0.3 s, paid by every request that got a new one)
        self.k = torch.empty(shape, dtype=dtype)
        self.v = torch.empty(shape, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.tokens: list[int] = []  # the ids held by slots [0, len(tokens)) (a prefix of the committed ones)

    def check_room(self, n: int) -> None:
        """Raise if n more pending entries would overflow the cache."""
        if self.length + n > self.max_len:
            raise ContextLengthError(
                f"sequence of {self.length + n} tokens exceeds the context length {self.max_len}"
            )

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store pending k/v `[kv_heads, n, head_dim]`; return the layer's keys/values so far (the
        torch attention path; its keys as rows also when they are blocked)."""
        end = self.length + k.shape[1]
        if not self.blocked:
            self.k[layer, :, self.length : end] = k
            self.v[layer, :, self.length : end] = v
            return self.k[layer, :, :end], self.v[layer, :, :end]
        keys, values = key_rows(self.k[layer]), value_rows(self.v[layer])
        keys[:, self.length : end] = k
        values[:, self.length : end] = v
        self.k[layer], self.v[layer] = blocked_keys(keys), paired_values(values)
        return keys[:, :end], values[:, :end]

    def keys(self) -> torch.Tensor:
        """All keys as `[layers, kv_heads, slots, head_dim]` rows (a view, or a copy when blocked)."""
        return key_rows(self.k) if self.blocked else self.k

    def values(self) -> torch.Tensor:
        """All values as rows, like `keys()`."""
        return value_rows(self.v) if self.blocked else self.v

    def append(self, n: int) -> None:
        """Commit all n pending entries."""
        self.check_room(n)
        self.length += n

    def keep(self, indices: list[int]) -> None:
        """Commit only the pending entries at `indices` (offsets into the pending block, ascending).

        Example: length 10, a 6-node tree was written to slots 10..15, the accepted path is nodes
        [0, 2, 5]: slots 10, 12, 15 move to 10, 11, 12 and length becomes 13.
        """
        n = len(indices)
        if indices != list(range(n)):  # a prefix is already in place
            self._move_pending(indices)
        self.length += n

    def _move_pending(self, indices: list[int]) -> None:
        """Move pending slots length + indices[i] to length + i (indices ascending)."""
        ops = layer_ops() if self.blocked else None
        if ops is not None:  # a blocked cache: 15 us, where the torch moves below take ~170
            ops.keep_slots(self.k, self.v, self.length, indices)
            return
        src = torch.tensor(indices, dtype=torch.long) + self.length
        if self.blocked:
            dst = torch.arange(self.length, self.length + len(indices))
            _move(self.k, KEY_BLOCK, 2, src, dst)
            _move(self.v, VALUE_BLOCK, 1, src, dst)
        else:
            rows = slice(self.length, self.length + len(indices))
            self.k[:, :, rows] = self.k.index_select(2, src)
            self.v[:, :, rows] = self.v.index_select(2, src)

    def truncate(self, n: int) -> None:
        """Forget every committed entry from slot n on."""
        if not 0 <= n <= self.length:
            raise ValueError(f"truncate({n}): must be between 0 and the current length {self.length}")
        self.length = n
        del self.tokens[n:]

    def remember(self, ids: list[int]) -> None:
        """Record that the committed slots begin with the entries of `ids` (a sequence's prompt and
        output so far). Every token but the newest has its entry; the newest may have one too, and
        the slots may go on past `ids` (draft tokens accepted after a stop was reached), which are
        not recorded."""
        self.tokens = list(ids[: self.length])

    def shared(self, ids: list[int]) -> int:
        """How many leading slots `reuse(ids)` would keep: the common prefix of `ids` and `tokens`,
        less `ids`' last token (a forward needs at least one new token to give logits)."""
        n, limit = 0, min(len(self.tokens), len(ids) - 1)
        while n < limit and self.tokens[n] == ids[n]:
            n += 1
        return n

    def reuse(self, ids: list[int]) -> int:
        """Keep the slots of the prefix shared with `ids`, drop the rest; returns how many were kept."""
        n = self.shared(ids)
        self.truncate(n)
        return n
