"""The slot KV cache: a fixed slot per running sequence, written in place by the decode step.

Per layer, keys and values are (slots, Hkv, C, d) float32 numpy arrays, and the decode graph gets
MindSpore tensors made with ``Tensor.from_numpy`` (documented to share the array's memory). The decode
attention kernel (``cogvlm2_cpu_kernels.decode_attention_op``) writes each step's key and value into
them at (slot, position) and attends over the slot's positions, so a decode step never copies the
cache; the functional cache's concat copied every row's whole cache each step, the largest cost that
grew with the batch. A sequence keeps its slot from prefill to its last token, so joining and leaving
the batch moves nothing.

``store(slot, past, row)`` copies a row of a prefill's functional cache into a slot; ``ensure(length)``
grows the capacity C (doubling, in blocks of ``block``) before a step would write past it.
"""
from typing import Sequence

import numpy as np
from mindspore import Tensor

from cogvlm2.cogvlm2_errors import ContextLengthError

__all__ = ["SlotKVCache"]


class SlotKVCache:
    """Keys and values of ``slots`` sequences for every layer of ``config``."""

    def __init__(self, config, slots: int, capacity: int = 256, block: int = 256):
        self.slots = slots
        self.block = block
        self.max_length = config.max_position_embeddings
        self._shape = (slots, config.num_multi_query_heads, 0, config.head_dim)
        self._layers = 2 * config.num_hidden_layers
        self._arrays = []
        self.tensors = ()
        self._resize(min(self._round(capacity), self.max_length))

    @property
    def capacity(self) -> int:
        """Positions per slot, C."""
        return self._arrays[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays)

    def ensure(self, length: int):
        """Room for ``length`` positions in every slot (doubling the capacity, in whole blocks)."""
        if length > self.max_length:
            raise ContextLengthError(f"a sequence needs {length} cached positions; the model's context is "
                                     f"{self.max_length} (max_position_embeddings)")
        if length > self.capacity:
            self._resize(min(self._round(max(length, 2 * self.capacity)), self.max_length))

    def store(self, slot: int, past: Sequence, row: int = 0, columns=None) -> int:
        """Row ``row`` of a prefill's functional cache (2 * layers tensors or arrays (B, Hkv, L, d)) into
        ``slot`` from position 0; ``columns``: the row's valid columns (left padding dropped), default
        all. -> the positions stored."""
        columns = np.arange(past[0].shape[2]) if columns is None else np.asarray(columns)
        self.ensure(len(columns))
        for array, values in zip(self._arrays, past):
            values = values.asnumpy() if isinstance(values, Tensor) else values
            array[slot, :, :len(columns)] = values[row][:, columns]
        return len(columns)

    def _round(self, length: int) -> int:
        return -(-length // self.block) * self.block

    def _resize(self, capacity: int):
        """New arrays of ``capacity`` positions holding the old contents (the tensors are rebuilt: a
        from_numpy tensor keeps its array's memory)."""
        shape = self._shape[:2] + (capacity,) + self._shape[3:]
        arrays = []
        for old in self._arrays or [None] * self._layers:
            array = np.zeros(shape, np.float32)
            if old is not None:
                array[:, :, :old.shape[2]] = old
            arrays.append(array)
        self._arrays = arrays
        self.tensors = tuple(Tensor.from_numpy(a) for a in arrays)
