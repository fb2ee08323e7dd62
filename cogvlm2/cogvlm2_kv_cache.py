"""The slot KV cache: a fixed slot per running sequence, written in place by the decode step.

Per layer, keys and values are (slots, Hkv, C, d) float32 numpy arrays with C = the model's context
(max_position_embeddings), and the decode graph gets MindSpore tensors made with ``Tensor.from_numpy``
(documented to share the array's memory). The decode attention kernel
(``cogvlm2_cpu_kernels.decode_attention_op``) writes each step's key and value into them at
(slot, position) and attends over the slot's positions, so a decode step never copies the cache; the
functional cache's concat copied every row's whole cache each step, the largest cost that grew with
the batch. A sequence keeps its slot from prefill to its last token, so joining and leaving the batch
moves nothing.

The arrays are allocated zeroed (calloc: the operating system maps pages only when first written), so
memory follows the positions written, not C; and with a fixed shape the decode graph compiles once
per batch size (``CogVLM2ForVideo.run_slot_step``).

``store(slot, past, row, columns)`` copies a row of a prefill's functional cache into a slot;
``check(length)`` raises if a sequence would need more positions than the context.
"""
from typing import Sequence

import numpy as np
from mindspore import Tensor

from cogvlm2.cogvlm2_errors import ContextLengthError

__all__ = ["SlotKVCache"]


class SlotKVCache:
    """Keys and values of ``slots`` sequences for every layer of ``config``."""

    def __init__(self, config, slots: int):
        self.slots = slots
        self.capacity = config.max_position_embeddings           # C, positions per slot
        shape = (slots, config.num_multi_query_heads, self.capacity, config.head_dim)
        self._arrays = [np.zeros(shape, np.float32) for _ in range(2 * config.num_hidden_layers)]
        self.tensors = tuple(Tensor.from_numpy(a) for a in self._arrays)   # (k0, v0, k1, v1, ...)

    def check(self, length: int):
        """A ContextLengthError unless ``length`` positions fit in a slot."""
        if length > self.capacity:
            raise ContextLengthError(f"a sequence needs {length} cached positions; the model's context is "
                                     f"{self.capacity} (max_position_embeddings)")

    def store(self, slot: int, past: Sequence, row: int = 0, columns=None) -> int:
        """Row ``row`` of a prefill's functional cache (2 * layers tensors or arrays (B, Hkv, L, d)) into
        ``slot`` from position 0; ``columns``: the row's valid columns (left padding dropped), default
        all. -> the positions stored."""
        columns = np.arange(past[0].shape[2]) if columns is None else np.asarray(columns)
        self.check(len(columns))
        for array, values in zip(self._arrays, past):
            values = values.asnumpy() if isinstance(values, Tensor) else values
            array[slot, :, :len(columns)] = values[row][:, columns]
        return len(columns)
