"""CogVLM2ForVideo: EVA2-CLIP-E vision tower + adapter + visual-expert Llama-3 decoder.

Two graphs are compiled (GRAPH_MODE by default), each once, and decode graphs on CPU:
- ``model.vision``: frames (c, 3, 224, 224) -> vision embeddings (c, 66, hidden), a static shape run
  on chunks of ``config.vision_batch_frames`` frames, left-over frames in chunks of half as many, down
  to one (``vision_graph_frames``; on CPU, static-shape kernels run this tower 1.7x faster than a
  dynamic T); with ``vision_kernels`` fused (auto on CPU) its GELU, LayerNorm, attention and SiLU * up
  are CPU kernels (``cogvlm2_cpu_kernels``);
- the causal-LM step (``CausalLMStep``), with dynamic batch, length and cache length: token ids +
  vision embeddings + cache -> logits at the requested positions + the extended cache. It serves
  prefill (empty cache) and every decode step; with ``gemm`` amx (auto on a CPU with AMX-BF16) its
  Linears, like the vision tower's, use the AMX product, which hands products of fewer than 16 rows
  to the rows kernel; with ``decoder_kernels`` fused (auto on CPU) its attention is the prefill
  attention kernel, and every decoder graph's RMSNorm and SwiGLU are CPU kernels;
- with ``decode_matmul`` rows (auto on CPU): the same step with the rows kernel in every decoder
  Linear and the lm_head (``decode_step``), which ``run_step`` uses for decode calls of 2-16
  sequences (one token each): oneDNN re-reads each weight for 2-15 rows, the kernel once;
- with ``kv_cache`` slots (auto on CPU): the decode step on the slot cache (``SlotDecodeStep``,
  ``run_slot_step``): one token per sequence, written into its slot in place by the decode attention
  kernel; one graph with ops.MatMul serves a single sequence, another with the rows kernel (when
  ``decode_matmul`` gives it) 2-16 sequences, as for ``decode_step``. These have static shapes,
  compiled once per padded batch size (1, 2, 4, 8, ...) and cache shape.
With ``kernel_threads`` pinned (auto on CPU) MindSpore's CPU kernel threads, which every graph's kernels run
on, are pinned one to a CPU (``cogvlm2_cpu_kernels.set_kernel_threads``).

The Python methods (``__call__``, ``encode_video``, ``run_step``, ``run_slot_step``) prepare numpy
inputs and call them.
The network holds no request state: generation (``cogvlm2_generation``) and serving many requests
(``cogvlm2_engine``) are layers above it that call ``encode_video``, ``run_step`` and ``run_slot_step``.
"""
import os
from typing import Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mutable, nn, ops
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from cogvlm2.cogvlm2_config import CogVLM2Config
from cogvlm2.cogvlm2_errors import CogVLM2ConfigError, CogVLM2InputError
from cogvlm2.cogvlm2_layers import BF16_BITS, Linear, to_ms_dtype
from cogvlm2.cogvlm2_llm import CogVLM2Model, DecoderKernels
from cogvlm2.cogvlm2_cpu_kernels import (ROWS_PER_PASS, amx_gated_op, amx_linear_gelu_op, amx_linear_norm_add_op,
                                         amx_linear_op, amx_matmul_op, decode_attention_op, gelu_op, layer_norm_op,
                                         patchify_op, prefill_attention_op, resolve_decode_matmul,
                                         resolve_decoder_kernels, resolve_gemm, resolve_kernel_threads,
                                         resolve_kv_cache, resolve_vision_kernels, rms_norm_op, rows_matmul_op,
                                         set_kernel_threads, silu_mul_op, vision_attention_op)
from cogvlm2.cogvlm2_vision import VisionKernels
from cogvlm2.cogvlm2_token_types import VISION_TOKEN_TYPE, build_position_ids, causal_bias, vision_expert_mask
from cogvlm2 import cogvlm2_weights as weights

__all__ = ["CogVLM2ForVideo", "CausalLMStep", "SlotDecodeStep", "padded_rows"]


def padded_rows(count: int, slots: int) -> int:
    """The batch size a slot decode step of ``count`` rows runs at on a cache of ``slots`` slots: the next
    power of two, at most ``slots`` (the slot graphs have static shapes, one per padded size)."""
    return min(1 << (count - 1).bit_length(), slots)


class CausalLMStep(nn.Cell):
    """Decoder + lm_head on the positions that need logits. Shares ``model``/``lm_head`` (and so their
    parameter names) with CogVLM2ForVideo.

    input_ids (B, L) int32, vision_embeds (N, H), vision_index (N, 1) int32, expert_mask (B, L),
    position_ids (B, L) int32, bias (B, 1, L, S+L) float32, past: tuple of 2*layers (B, Hkv, S, d),
    logits_index (M, 1) int32 flat positions b*L + l -> logits (M, vocab) float32, new past.

    matmul: the product every decoder Linear and the lm_head use in this graph (None: ops.MatMul;
    the decode step graph gets the rows kernel, see ``cogvlm2_cpu_kernels``); attend: the decoder's
    attention (None: ``cogvlm2_layers.attention``; on CPU the prefill attention kernel); head_matmul: the
    lm_head's product on the picked rows, if not ``matmul`` (the prefill graph with ops.MatMul gets the
    rows kernel: it reads the vocab x hidden weight once, bfloat16 bits as they are, where MatMul would
    take a float32 copy, 2.1 GB for the real model's).
    """

    def __init__(self, model: CogVLM2Model, lm_head: Linear, matmul=None, attend=None, head_matmul=None):
        super().__init__()
        self.model = model
        self.lm_head = lm_head
        self.matmul = matmul
        self.attend = attend
        self.head_matmul = matmul if head_matmul is None else head_matmul

    @ms.jit   # compiled as a graph in PYNATIVE_MODE too (GRAPH_MODE compiles every Cell anyway)
    def construct(self, input_ids, vision_embeds, vision_index, expert_mask, position_ids, bias, past,
                  logits_index):
        hidden, new_past = self.model(input_ids, vision_embeds, vision_index, expert_mask, position_ids,
                                      bias, past, self.matmul, self.attend)        # (B*L, H)
        picked = ops.gather_nd(hidden, logits_index)                               # (M, H)
        return self.lm_head(picked, self.head_matmul).astype(ms.float32), new_past # (M, vocab)


class SlotDecodeStep(nn.Cell):
    """One language token per sequence on the slot cache (``cogvlm2_kv_cache``): decoder + lm_head.

    input_ids, position_ids (B, 1) int32; cache: 2*layers (S_slots, Hkv, C, d) float32, written in place
    at (slots[b], cache_positions[b]); slots, cache_positions (B,) int32 -> logits (B, vocab) float32.
    """

    def __init__(self, model: CogVLM2Model, lm_head: Linear, attend, matmul=None):
        super().__init__()
        self.model = model
        self.lm_head = lm_head
        self.attend = attend
        self.matmul = matmul

    @ms.jit
    def construct(self, input_ids, position_ids, cache, slots, cache_positions):
        hidden = self.model.decode(input_ids, position_ids, cache, slots, cache_positions, self.attend,
                                   self.matmul)                                    # (B, H)
        return self.lm_head(hidden, self.matmul).astype(ms.float32)                # (B, vocab)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class CogVLM2ForVideo(PreTrainedModel):
    """CogVLM2-Video-Llama3-Chat for MindSpore (``CogVLMVideoForCausalLM`` in the official code)."""

    config_class = CogVLM2Config
    base_model_prefix = "model"

    def __init__(self, config: CogVLM2Config = None, compile_graphs: bool = True, **kwargs):
        config = config if config is not None else CogVLM2Config()
        if isinstance(config, dict):
            config = CogVLM2Config(**config)
        super().__init__(config, **kwargs)
        self.config = config
        if compile_graphs:
            _check_device_dtype(config)
            _pin_kernel_threads(config)
        # the product of the vision tower, the adapter and the step graph (prefill) as gemm resolves
        gemm = _gemm(config) if compile_graphs else None
        decoder = compile_graphs and _decoder_kernels_fused(config)
        self.model = CogVLM2Model(config, _vision_kernels(config, gemm) if compile_graphs else VisionKernels(),
                                  DecoderKernels(rms_norm_op(), silu_mul_op()) if decoder else DecoderKernels())
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, to_ms_dtype(config.param_init_type))
        # Not registered as child cells: they share model/lm_head, whose names stay model.* / lm_head.*
        attend = prefill_attention_op() if decoder else None
        rows = compile_graphs and resolve_decode_matmul(config.decode_matmul, ms.get_context("device_target"),
                                                        config.compute_dtype) == "rows"
        # the prefill's logits rows: the rows kernel when ops.MatMul would take them (gemm: onednn)
        head = rows_matmul_op() if rows and gemm is None else None
        object.__setattr__(self, "step", CausalLMStep(self.model, self.lm_head, gemm, attend, head))
        # decode calls (one token per row, 2..ROWS_PER_PASS rows) get their own graph when
        # decode_matmul resolves to the rows kernel; None: the one step graph serves every call
        object.__setattr__(self, "decode_step", None)
        # decode steps on the slot cache when kv_cache resolves to slots: slot_step (ops.MatMul) for one
        # sequence, slot_rows_step (the rows kernel, when decode_matmul gives it) for 2..ROWS_PER_PASS;
        # None: decode extends the functional cache through run_step
        object.__setattr__(self, "slot_step", None)
        object.__setattr__(self, "slot_rows_step", None)
        if compile_graphs:
            device = ms.get_context("device_target")
            if rows:
                object.__setattr__(self, "decode_step",
                                   CausalLMStep(self.model, self.lm_head, rows_matmul_op(), attend))
            if resolve_kv_cache(config.kv_cache, device, config.compute_dtype) == "slots":
                # one sequence: oneDNN's mat-vec reads float32 W once; bfloat16 weights go to the rows kernel,
                # which reads their bits (MindSpore's MatMul would get them widened, every step)
                single = rows_matmul_op() if rows and self.lm_head.weight.dtype == BF16_BITS else None
                object.__setattr__(self, "slot_step", SlotDecodeStep(self.model, self.lm_head, decode_attention_op(),
                                                                     single))
                if rows:
                    object.__setattr__(self, "slot_rows_step", SlotDecodeStep(self.model, self.lm_head,
                                                                              decode_attention_op(), rows_matmul_op()))
            if config.is_dynamic:
                self._declare_dynamic_inputs()

    # ----- graphs --------------------------------------------------------------------------------
    def _declare_dynamic_inputs(self):
        """One compiled graph per step kind for every batch size, length and cache length."""
        for step in (self.step, self.decode_step):
            if step is not None:
                self._declare_step_inputs(step)
        # the slot steps keep static shapes (run_slot_step)

    def _declare_step_inputs(self, step: CausalLMStep):
        c = self.config
        dtype = to_ms_dtype(c.compute_dtype)
        kv = Tensor(shape=[None, c.num_multi_query_heads, None, c.head_dim], dtype=dtype)
        step.set_inputs(
            Tensor(shape=[None, None], dtype=ms.int32),                  # input_ids
            Tensor(shape=[None, c.hidden_size], dtype=dtype),            # vision_embeds
            Tensor(shape=[None, 1], dtype=ms.int32),                     # vision_index
            Tensor(shape=[None, None], dtype=ms.float32),                # expert_mask
            Tensor(shape=[None, None], dtype=ms.int32),                  # position_ids
            Tensor(shape=[None, 1, None, None], dtype=ms.float32),       # bias
            mutable(tuple(kv for _ in range(2 * c.num_hidden_layers))),  # past
            Tensor(shape=[None, 1], dtype=ms.int32))                     # logits_index

    def empty_cache(self, batch_size: int) -> tuple:
        """A KV cache with no tokens: 2 * layers tensors (B, Hkv, 0, d)."""
        c = self.config
        empty = Tensor(np.zeros((batch_size, c.num_multi_query_heads, 0, c.head_dim), np.float32),
                       dtype=to_ms_dtype(c.compute_dtype))
        return mutable(tuple(empty for _ in range(2 * c.num_hidden_layers)))

    # ----- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, **config_overrides) -> "CogVLM2ForVideo":
        """Load a HF checkpoint directory (converted on the fly) or a converted MindSpore directory."""
        config = CogVLM2Config.from_hf_config(path, **config_overrides)
        model = cls(config)
        model.load_weights(path)
        return model

    def load_weights(self, directory: str):
        """Copy every parameter from a HF or converted checkpoint directory; any missing, unexpected
        or mis-shaped tensor is a CheckpointError naming it, so no parameter keeps its placeholder."""
        params = dict(self.parameters_and_names())
        layout = weights.checkpoint_layout(self)
        converted = weights.is_converted_dir(directory)
        # a converted directory stores the model's own layout, a HF one the PyTorch layout
        expected = {name: tuple(p.shape) if converted else layout[name][0] for name, p in params.items()}
        seen = set()
        for path, name, st_dtype, stored in weights.iter_checkpoint(directory):
            weights.check_tensor(name, stored.shape, expected, os.path.basename(path))
            if not converted:
                stored = weights.to_model_layout(stored, layout[name][1])
            param = params[name]
            param.set_data(weights.parameter_tensor(param, stored, os.path.basename(path), st_dtype))
            seen.add(name)
        weights.check_complete(seen, expected, directory)

    # ----- vision --------------------------------------------------------------------------------
    def encode_video(self, pixel_values) -> Tensor:
        """Frames (T, 3, 224, 224) float32 -> vision embeddings (T, 66, hidden)."""
        pixels = np.asarray(pixel_values.asnumpy() if isinstance(pixel_values, Tensor) else pixel_values,
                            dtype=np.float32)
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (self.config.vision_config.in_channels, size, size):
            raise CogVLM2InputError(f"pixel_values has shape {pixels.shape}; expected (T, 3, {size}, {size}) "
                                    "from CogVLM2Processor")
        spans, start = [], 0
        for count in self.vision_graph_frames():        # as many of the largest chunk as fit, then smaller
            while len(pixels) - start >= count:
                spans.append((start, count))
                start += count
        frames = [self.model.vision(Tensor(pixels[s:s + n])) for s, n in spans]  # (n, 66, H) each
        return ops.concat(frames, 0) if len(frames) > 1 else frames[0]

    def vision_graph_frames(self) -> Tuple[int, ...]:
        """The frame counts of the static-shape vision graphs, largest first: ``vision_batch_frames``, then
        halved down to one frame (6 -> 6, 3, 1). A video runs as many of the largest as fit, then the
        rest in smaller ones, so at most one call of each smaller size."""
        counts, count = [], max(1, self.config.vision_batch_frames)
        while count >= 1:
            counts.append(count)
            count //= 2
        return tuple(counts)

    # ----- one forward pass ----------------------------------------------------------------------
    def _graph_inputs(self, input_ids, vision_embeds, token_type_ids, position_ids, bias) -> tuple:
        """numpy (B, L) inputs -> the step graph's first six Tensors. vision_embeds: (N, H) for the N
        VISION tokens in row-major order, or None."""
        flat_vision = np.flatnonzero(token_type_ids.reshape(-1) == VISION_TOKEN_TYPE)
        if vision_embeds is None:
            if flat_vision.size:
                raise CogVLM2InputError(f"{flat_vision.size} VISION tokens in token_type_ids but no video given")
            vision_embeds = Tensor(np.zeros((0, self.config.hidden_size), np.float32),
                                   dtype=to_ms_dtype(self.config.compute_dtype))
        elif vision_embeds.shape[0] != flat_vision.size:
            raise CogVLM2InputError(f"the video gives {vision_embeds.shape[0]} vision embeddings but token_type_ids "
                             f"marks {flat_vision.size} VISION tokens; build inputs with CogVLM2Processor")
        return (Tensor(input_ids.astype(np.int32)),
                vision_embeds,
                Tensor(flat_vision.reshape(-1, 1).astype(np.int32)),
                Tensor(vision_expert_mask(token_type_ids)),
                Tensor(position_ids.astype(np.int32)),
                Tensor(bias.astype(np.float32)))

    def run_step(self, input_ids: np.ndarray, vision_embeds, token_type_ids: np.ndarray,
                 position_ids: np.ndarray, bias: np.ndarray, past, logits_index: np.ndarray):
        """Run the compiled step. logits_index: flat positions b*L + l that need logits.
        Returns (logits (M, vocab) Tensor, new past). Decode calls of several sequences, input_ids
        (B, 1) with 2 <= B <= ROWS_PER_PASS, run the decode step graph when there is one
        (decode_matmul); one row stays on the step graph: oneDNN, whose mat-vec kernel already reads W
        once and measured 10% faster than the rows kernel on the lm_head, or with ``gemm`` amx the rows
        kernel (the AMX product's choice below 16 rows; the bench model's batch-1 decode measured the
        same, 26.9-27.2 against 27.0-27.3 tokens/s)."""
        inputs = self._graph_inputs(input_ids, vision_embeds, token_type_ids, position_ids, bias)
        decode = self.decode_step is not None and input_ids.shape[1] == 1 and 2 <= input_ids.shape[0] <= ROWS_PER_PASS
        step = self.decode_step if decode else self.step
        return step(*inputs, mutable(tuple(past)), Tensor(logits_index.reshape(-1, 1).astype(np.int32)))

    def run_slot_step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache, slots: np.ndarray,
                      cache_positions: np.ndarray) -> Tensor:
        """One language token per sequence on the slot cache (a ``cogvlm2_kv_cache.SlotKVCache``):
        input_ids, position_ids (B, 1); slots, cache_positions (B,), the slots all different. Writes each
        token's keys and values into its slot; -> logits (B, vocab) Tensor.

        The slot graphs have static shapes: with dynamic ones MindSpore re-infers and resizes each of
        the step's ~230 kernels on every call, which cost 17% of a single-sequence step (44.6 -> 36.9 ms,
        bench model, interleaved). The cache's shape is fixed, so only B varies: rows are padded up to
        a power of two (at most the cache's slots) with rows on free slots at position 0, and each
        graph compiles once per padded size (1, 2, 4, 8 for 8 slots). One sequence runs ops.MatMul
        (oneDNN's mat-vec reads each weight once), 2..ROWS_PER_PASS the rows kernel when there is one."""
        if self.slot_step is None:
            raise CogVLM2ConfigError("this model has no slot decode step (kv_cache resolved to concat)")
        count = len(slots)
        padded = padded_rows(count, cache.slots)
        free = np.setdiff1d(np.arange(cache.slots), slots)[:padded - count]
        pad = np.zeros(padded - count, np.int64)
        step = self.slot_rows_step if 2 <= padded <= ROWS_PER_PASS and self.slot_rows_step is not None \
            else self.slot_step
        logits = step(Tensor(np.concatenate([np.asarray(input_ids).reshape(-1), pad]).astype(np.int32)[:, None]),
                      Tensor(np.concatenate([np.asarray(position_ids).reshape(-1), pad]).astype(np.int32)[:, None]),
                      mutable(tuple(cache.tensors)),
                      Tensor(np.concatenate([np.asarray(slots).reshape(-1), free]).astype(np.int32)),
                      Tensor(np.concatenate([np.asarray(cache_positions).reshape(-1), pad]).astype(np.int32)))
        return logits if padded == count else logits[:count]

    def hidden_states(self, input_ids, pixel_values=None, token_type_ids=None, position_ids=None,
                      vision_embeds=None) -> list:
        """Decoder hidden states for checking against the reference: [input embeddings (after the
        vision scatter), input of layers 1..n-1, final norm output], each (B, L, H) numpy."""
        ids, types, positions, mask = self.prepare_inputs(input_ids, token_type_ids, position_ids, None)
        vision_embeds = self.vision_rows(pixel_values, vision_embeds)
        inputs = self._graph_inputs(ids, vision_embeds, types, positions, causal_bias(mask, 0))
        return [h.asnumpy() for h in self.model.trace(*inputs)]

    def vision_rows(self, pixel_values, vision_embeds):
        """Vision embeddings as (T*66, H) rows, encoding the frames if only pixel_values are given."""
        if vision_embeds is None and pixel_values is not None:
            vision_embeds = self.encode_video(pixel_values)
        if vision_embeds is None:
            return None
        if not isinstance(vision_embeds, Tensor):
            vision_embeds = Tensor(np.asarray(vision_embeds, np.float32),
                                   dtype=to_ms_dtype(self.config.compute_dtype))
        return vision_embeds.reshape(-1, self.config.hidden_size)

    def __call__(self, input_ids, pixel_values=None, token_type_ids=None, position_ids=None,
                 vision_embeds=None, attention_mask=None) -> Tensor:
        """Full forward pass: logits (B, L, vocab) float32 for every position."""
        ids, types, positions, mask = self.prepare_inputs(input_ids, token_type_ids, position_ids, attention_mask)
        vision_embeds = self.vision_rows(pixel_values, vision_embeds)
        b, length = ids.shape
        logits, _ = self.run_step(ids, vision_embeds, types, positions, causal_bias(mask, 0),
                                  self.empty_cache(b), np.arange(b * length))
        return logits.reshape(b, length, -1)

    def prepare_inputs(self, input_ids, token_type_ids, position_ids, attention_mask):
        """numpy (B, L) arrays with defaults: all-language types, positions from the token types."""
        ids = _as_2d(input_ids, "input_ids")
        types = np.zeros_like(ids) if token_type_ids is None else _as_2d(token_type_ids, "token_type_ids")
        if position_ids is None:
            positions = np.stack([build_position_ids(row) for row in types])
        else:
            positions = _as_2d(position_ids, "position_ids")
        mask = np.ones_like(ids) if attention_mask is None else _as_2d(attention_mask, "attention_mask")
        for name, arr in (("token_type_ids", types), ("position_ids", positions), ("attention_mask", mask)):
            if arr.shape != ids.shape:
                raise CogVLM2InputError(f"{name} has shape {arr.shape}, input_ids has {ids.shape}; they must match")
        return ids, types, positions, mask

    # ----- mindformers Trainer flow hooks: strict loading (see cogvlm2_weights) ------------------
    def convert_name(self, weight_name: str):
        return weights.hf_to_ms_name(weight_name)

    def convert_weight_dict(self, source_dict, **kwargs):
        del kwargs  # model_config: the network already holds it
        return weights.convert_weight_dict(self, source_dict)

    def obtain_qkv_ffn_concat_keys(self):
        return None   # q, k and v are one fused tensor in the checkpoint already

    def init_parameters_data(self, auto_parallel_mode=False):
        weights.check_parameters_loaded(self)
        return super().init_parameters_data(auto_parallel_mode)


def _gemm(config):
    """The AMX product if ``gemm`` resolves to amx, else None (ops.MatMul)."""
    if resolve_gemm(config.gemm, ms.get_context("device_target"), config.compute_dtype) == "amx":
        return amx_matmul_op()
    return None


def _decoder_kernels_fused(config) -> bool:
    """Whether ``decoder_kernels`` resolves to the CPU kernels (RMSNorm, SiLU * up, prefill attention)."""
    return resolve_decoder_kernels(config.decoder_kernels, ms.get_context("device_target"),
                                   config.compute_dtype) == "fused"


def _vision_kernels(config, matmul) -> VisionKernels:
    """The GELU, LayerNorm, attention and SiLU * up of the vision tower and adapter, as ``vision_kernels``
    resolves, and ``matmul`` (``_gemm``: the AMX product or None) as their product, with the AMX product
    that also adds the bias for the biased Linears; with both, the AMX products that also do the GELU
    after fc1 and the LayerNorm and residual add after each branch, the adapter's gate and up products
    with silu(gate) * up, and the patch kernel that makes the patch convolution a product."""
    amx = {"linear": amx_linear_op()} if matmul is not None else {}
    if resolve_vision_kernels(config.vision_kernels, ms.get_context("device_target"), config.compute_dtype) == "fused":
        if amx:
            amx.update(linear_gelu=amx_linear_gelu_op(), linear_norm_add=amx_linear_norm_add_op(),
                       patches=patchify_op(), gated=amx_gated_op())
        return VisionKernels(gelu=gelu_op(), layer_norm=layer_norm_op(),
                             attention=vision_attention_op(config.vision_config.num_heads), matmul=matmul,
                             silu_mul=silu_mul_op(), **amx)
    return VisionKernels(matmul=matmul, **amx)


def _pin_kernel_threads(config):
    """``kernel_threads`` as it resolves: MindSpore's CPU kernel threads pinned one to a CPU (process-wide,
    from the next kernel call), or given back every CPU if this config says free where the kernels run."""
    device = ms.get_context("device_target")
    pinned = resolve_kernel_threads(config.kernel_threads, device, config.compute_dtype) == "pinned"
    if pinned or (config.kernel_threads == "free" and device == "CPU" and config.compute_dtype == "float32"):
        set_kernel_threads(pinned)


def _check_device_dtype(config):
    """MindSpore's CPU MatMul/Conv2D have no bfloat16/float16 kernels: refuse before any compile."""
    if ms.get_context("device_target") == "CPU" and config.compute_dtype != "float32":
        raise CogVLM2ConfigError(
            f"compute_dtype {config.compute_dtype!r} does not run on CPU (no {config.compute_dtype} MatMul/Conv2D "
            "kernels); set model_config compute_dtype: float32 for CPU (param_init_type float32, or bfloat16 to keep "
            "a bf16 checkpoint's Linear weights in bfloat16)")


def _as_2d(x, name: str) -> np.ndarray:
    arr = x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise CogVLM2InputError(f"{name} must be (B, L) or (L,), got shape {arr.shape}")
    return arr.astype(np.int64)
