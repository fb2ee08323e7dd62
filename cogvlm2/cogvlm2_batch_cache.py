"""The engine's decode batch and its KV cache, two ways (``kv_cache`` in the config):

- ``SlotBatch`` (float32 CPU): each running sequence owns a slot of a ``SlotKVCache`` from its prefill to
  its last token; the decode step (``run_slot_step``) writes every row's new key and value into its slot
  in place, so joining, leaving and decoding copy no cache.
- ``ConcatBatch`` (every backend): the functional cache, a tuple of 2*layers tensors (B, Hkv, S, d),
  left-padded: row b's valid columns are ``valid[b]``; a joining sequence's cache is padded to the
  batch's length (or the batch to its), and columns no row uses any more are trimmed when a sequence
  leaves. The step graph extends it by concat, which copies every row's cache each step.

Both keep their rows in the engine's order: ``join`` appends a prefilled sequence, ``step`` decodes one
token for every row, ``keep`` keeps the given rows, ``reset`` empties the batch.
"""
from typing import List, Sequence

import numpy as np
from mindspore import Tensor, mutable, ops

from cogvlm2.cogvlm2_kv_cache import SlotKVCache
from cogvlm2.cogvlm2_token_types import LANGUAGE_TOKEN_TYPE, causal_bias

__all__ = ["SlotBatch", "ConcatBatch", "decode_batch"]


def decode_batch(model, max_batch_size: int):
    """The batch kind the model supports: slots when it has the slot decode step."""
    return SlotBatch(model, max_batch_size) if model.slot_step is not None else ConcatBatch(model)


class SlotBatch:
    """Rows on the slots of one ``SlotKVCache`` with ``slots`` slots."""

    def __init__(self, model, slots: int):
        self.model = model
        self.cache = SlotKVCache(model.config, slots)
        self._free = list(range(slots - 1, -1, -1))
        self._slots: List[int] = []          # each row's slot
        self._lengths: List[int] = []        # each row's cached positions

    def join(self, past: Sequence, length: int):
        """A prefilled sequence's cache (2*layers tensors (1, Hkv, length, d)) into a free slot."""
        slot = self._free.pop()
        self.cache.store(slot, past)
        self._slots.append(slot)
        self._lengths.append(length)

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """tokens, positions (B, 1) -> logits (B, vocab); every row's cache grows by one position."""
        cache_positions = np.asarray(self._lengths, np.int32)
        self.cache.check(int(cache_positions.max()) + 1)
        logits = self.model.run_slot_step(tokens, positions, self.cache, np.asarray(self._slots, np.int32),
                                          cache_positions).asnumpy()
        self._lengths = [n + 1 for n in self._lengths]
        return logits

    def keep(self, keep: List[int]):
        kept = set(keep)
        self._free.extend(slot for row, slot in enumerate(self._slots) if row not in kept)
        self._slots = [self._slots[i] for i in keep]
        self._lengths = [self._lengths[i] for i in keep]

    def reset(self):
        self.keep([])


class ConcatBatch:
    """Rows of the functional, left-padded cache."""

    def __init__(self, model):
        self.model = model
        self._past = None                                   # tuple of 2*layers (B, Hkv, S, d)
        self._valid = np.zeros((0, 0), dtype=bool)          # (B, S) columns that hold a token

    def join(self, past: Sequence, length: int):
        """Add a prefilled sequence's cache (1, Hkv, length, d) to the batch cache, left-padded."""
        if self._past is None:
            self._past, self._valid = tuple(past), np.ones((1, length), dtype=bool)
            return
        width = self._valid.shape[1]
        total = max(width, length)
        batch = [_left_pad(t, total - width) for t in self._past]
        new = [_left_pad(t, total - length) for t in past]
        self._past = tuple(ops.concat((b, n), 0) for b, n in zip(batch, new))
        valid = np.zeros((len(self._valid) + 1, total), dtype=bool)
        valid[:-1, total - width:] = self._valid
        valid[-1, total - length:] = True
        self._valid = valid

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        batch = len(tokens)
        valid = np.concatenate([self._valid, np.ones((batch, 1), dtype=bool)], 1)   # (B, S + 1)
        bias = causal_bias(valid.astype(np.int64), valid.shape[1] - 1)              # (B, 1, 1, S + 1)
        logits, past = self.model.run_step(tokens, None, np.full((batch, 1), LANGUAGE_TOKEN_TYPE), positions,
                                           bias, mutable(self._past), np.arange(batch))
        logits = logits.asnumpy()                                                    # (B, vocab)
        self._past, self._valid = tuple(past), valid
        return logits

    def keep(self, keep: List[int]):
        """Shrink the batch to the rows ``keep``, trimming cache columns no remaining row uses."""
        if not keep:
            self.reset()
            return
        valid = self._valid[keep]
        first = int(np.argmax(valid.any(0)))            # leading columns that are padding in every row
        index = Tensor(np.asarray(keep, dtype=np.int32))
        self._past = tuple(ops.gather(t, index, 0)[:, :, first:] for t in self._past)
        self._valid = valid[:, first:]

    def reset(self):
        self._past, self._valid = None, np.zeros((0, 0), dtype=bool)


def _left_pad(tensor, count: int):
    """(B, H, S, d) -> (B, H, count + S, d) with zeros in front."""
    if count == 0:
        return tensor
    b, h, _, d = tensor.shape
    return ops.concat((ops.zeros((b, h, count, d), tensor.dtype), tensor), 2)
