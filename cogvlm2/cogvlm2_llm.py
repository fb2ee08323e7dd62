"""The CogVLM2 visual-expert Llama-3 decoder: GQA attention with a KV cache, rotary embeddings at
explicit position ids, RMSNorm, SwiGLU.

Parameter names follow the HF checkpoint under ``model.*`` (``embed_tokens``, ``layers.N.self_attn.
language_expert_query_key_value``, ``layers.N.mlp.language_mlp.gate_proj`` ...). The expert set comes
from the config: the video model has only the language expert; the image model (CogVLM2-19B) adds
``vision_expert_*`` weights used by the tokens that ``cogvlm2_token_types.vision_expert_mask`` marks.

Two ways to run it:
- ``construct``: the functional KV cache. Each layer takes its past keys/values (B, Hkv, S, d) and
  returns them with the new ones appended, so one compiled graph with dynamic B, L and S serves prefill
  (S = 0) and every decode step, on every backend.
- ``decode``: one new (language) token per sequence against a slot cache (S_slots, Hkv, C, d) per layer:
  the ``attend`` kernel takes the fused q/k/v projection, rotates and scales, writes this token into the
  cache in place and attends (``cogvlm2_kv_cache``, ``cogvlm2_cpu_kernels.decode_attention_op``): no
  per-step copy of the cache.
"""
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from cogvlm2.cogvlm2_layers import Embedding, Linear, RMSNorm, attention, grouped_bias, swiglu, to_ms_dtype
from cogvlm2.cogvlm2_vision import EVA2CLIPModel, VisionKernels

__all__ = ["CogVLM2Model", "DecoderKernels"]


class DecoderKernels(NamedTuple):
    """The RMSNorm and SwiGLU every decoder layer uses (None: MindSpore's ops; on CPU
    ``cogvlm2_cpu_kernels.rms_norm_op`` / ``silu_mul_op``, chosen by ``decoder_kernels``). The attention
    kernel is not here: only the inference step graphs pass it (``CausalLMStep``)."""
    rms_norm: object = None      # (x (N, H), weight (H,), eps (1,)) -> (N, H)
    silu_mul: object = None      # (gate, up) -> silu(gate) * up


class RotaryEmbedding(nn.Cell):
    """Rotate-half (GPT-NeoX) rotary embedding over the full head_dim at explicit positions."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        inv_freq = (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)
        self.inv_freq = Tensor(inv_freq.reshape(1, 1, -1))  # (1, 1, d/2)

    def construct(self, position_ids):
        freqs = position_ids.astype(ms.float32).expand_dims(-1) * self.inv_freq  # (B, L, d/2)
        emb = ops.concat((freqs, freqs), -1).expand_dims(1)                      # (B, 1, L, d)
        return ops.cos(emb), ops.sin(emb)


def expand_rotary(cos, sin, heads: int, dtype):
    """cos/sin (B, 1, L, d) -> (B, heads, L, d), so the rotation multiplies same-shape tensors."""
    b, _, length, d = cos.shape
    shape = (b, heads, length, d)
    return ops.broadcast_to(cos, shape).astype(dtype), ops.broadcast_to(sin, shape).astype(dtype)


def apply_rotary(x, rope):
    """x (B, H, L, d) rotated by the angles in rope = (cos, sin), each (B, H, L, d)."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


def _route(expert_mask, language_out, vision_out):
    """Per-token expert choice on flat (B*L, D) outputs; expert_mask (B, L) is 1 where the vision
    expert applies."""
    m = ops.broadcast_to(expert_mask.reshape(-1, 1).astype(language_out.dtype), language_out.shape)
    return language_out + (vision_out - language_out) * m


class VisionExpertAttention(nn.Cell):
    """Fused-qkv GQA attention with per-token experts and a functional KV cache."""

    def __init__(self, config, dtype):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_multi_query_heads
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.kv_size = config.kv_size
        self.scale = self.head_dim ** -0.5
        self.decode_scale = Tensor([self.scale], ms.float32)                     # the decode kernel's (1,)
        qkv_size = self.hidden_size + 2 * self.kv_size
        self.language_expert_query_key_value = Linear(self.hidden_size, qkv_size, False, dtype)
        self.language_expert_dense = Linear(self.hidden_size, self.hidden_size, False, dtype)
        self.has_vision_expert = config.expert_set == "vision_language"
        if self.has_vision_expert:
            self.vision_expert_query_key_value = Linear(self.hidden_size, qkv_size, True, dtype)
            self.vision_expert_dense = Linear(self.hidden_size, self.hidden_size, False, dtype)

    def _heads(self, x, heads, b, length):
        return x.reshape(b, length, heads, self.head_dim).swapaxes(1, 2)   # (B, heads, L, d)

    def _rotated_heads(self, qkv, rope_q, rope_k, b, length):
        """Fused (B*L, H + 2*kv) -> q (B, Hq, L, d), k, v (B, Hkv, L, d), q and k rotated."""
        q = self._heads(qkv[:, :self.hidden_size], self.num_heads, b, length)
        k = self._heads(qkv[:, self.hidden_size:self.hidden_size + self.kv_size], self.num_kv_heads, b, length)
        v = self._heads(qkv[:, self.hidden_size + self.kv_size:], self.num_kv_heads, b, length)
        return apply_rotary(q, rope_q), apply_rotary(k, rope_k), v

    def construct(self, x, expert_mask, rope_q, rope_k, bias, past_key, past_value, matmul=None, attend=None):
        """x: (B*L, H) flat tokens; rope_q/rope_k: (cos, sin) each (B, heads, L, d). attend: the prefill
        attention kernel ((q, k, v, bias (B, 1, L, S)) -> (B, L, H)), or None: ``attention`` on the
        grouped bias (``CogVLM2Model.layer_inputs`` gives the bias each wants)."""
        b, _, length, _ = rope_q[0].shape
        qkv = self.language_expert_query_key_value(x, matmul)                    # (B*L, H + 2*kv)
        if self.has_vision_expert:
            qkv = _route(expert_mask, qkv, self.vision_expert_query_key_value(x, matmul))
        q, k, v = self._rotated_heads(qkv, rope_q, rope_k, b, length)
        key = ops.concat((past_key, k), 2)                                 # (B, Hkv, S + L, d)
        value = ops.concat((past_value, v), 2)
        if attend is None:
            out = attention(q, key, value, bias, self.scale)               # (B, Hq, L, d)
            out = out.swapaxes(1, 2).reshape(b * length, self.hidden_size)
        else:
            out = attend(q, key, value, bias).reshape(b * length, self.hidden_size)   # (B, L, H) -> (B*L, H)
        dense = self.language_expert_dense(out, matmul)
        if self.has_vision_expert:
            dense = _route(expert_mask, dense, self.vision_expert_dense(out, matmul))
        return dense, key, value

    def decode(self, x, cos, sin, key_cache, value_cache, slots, cache_positions, attend, matmul=None):
        """x: (B, H), one language token per sequence -> (B, H); cos, sin: (B, d), the rotary angles at each
        row's position. key_cache/value_cache: the slot cache (S_slots, Hkv, C, d). ``attend`` rotates q and
        k, scales q, writes this token's key and value to (slots[b], cache_positions[b]) in place and attends
        over each slot's positions 0..cache_positions[b]."""
        qkv = self.language_expert_query_key_value(x, matmul)                    # (B, H + 2*kv)
        out = attend(qkv, cos, sin, self.decode_scale, key_cache, value_cache, slots, cache_positions)  # (B, H)
        return self.language_expert_dense(out, matmul)


class LlamaMLP(nn.Cell):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config, dtype, silu_mul=None):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, False, dtype)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, False, dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, False, dtype)
        self.silu_mul = silu_mul

    def construct(self, x, matmul=None):
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj, matmul, self.silu_mul)


class VisionExpertMLP(nn.Cell):
    def __init__(self, config, dtype, silu_mul=None):
        super().__init__()
        self.language_mlp = LlamaMLP(config, dtype, silu_mul)
        self.has_vision_expert = config.expert_set == "vision_language"
        if self.has_vision_expert:
            self.vision_mlp = LlamaMLP(config, dtype, silu_mul)

    def construct(self, x, expert_mask, matmul=None):
        out = self.language_mlp(x, matmul)
        if self.has_vision_expert:
            out = _route(expert_mask, out, self.vision_mlp(x, matmul))
        return out


class CogVLMDecoderLayer(nn.Cell):
    """Pre-norm Llama block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config, dtype, kernels: DecoderKernels):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, kernels.rms_norm)
        self.self_attn = VisionExpertAttention(config, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, kernels.rms_norm)
        self.mlp = VisionExpertMLP(config, dtype, kernels.silu_mul)

    def construct(self, x, expert_mask, rope_q, rope_k, bias, past_key, past_value, matmul=None, attend=None):
        """x: (B*L, H) -> (B*L, H) and this layer's extended cache."""
        attn, key, value = self.self_attn(self.input_layernorm(x), expert_mask, rope_q, rope_k, bias,
                                          past_key, past_value, matmul, attend)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h), expert_mask, matmul), key, value

    def decode(self, x, cos, sin, key_cache, value_cache, slots, cache_positions, attend, matmul=None):
        """One language token per sequence, x: (B, H) -> (B, H), on the slot cache (see the attention's)."""
        h = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, key_cache, value_cache, slots,
                                      cache_positions, attend, matmul)
        return h + self.mlp.language_mlp(self.post_attention_layernorm(h), matmul)


class CogVLM2Model(nn.Cell):
    """HF ``model``: token embeddings, vision tower, decoder layers, final norm.

    ``construct`` runs the decoder on token ids whose VISION positions are replaced by the given
    vision embeddings; it is compiled once with dynamic batch, length and cache length.
    """

    def __init__(self, config, vision_kernels: VisionKernels = VisionKernels(),
                 decoder_kernels: DecoderKernels = DecoderKernels()):
        super().__init__()
        dtype = to_ms_dtype(config.param_init_type)
        self.compute_dtype = to_ms_dtype(config.compute_dtype)
        self.hidden_size = config.hidden_size
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, as_bits=True)
        self.layers = nn.CellList([CogVLMDecoderLayer(config, dtype, decoder_kernels)
                                   for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, decoder_kernels.rms_norm)
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_multi_query_heads
        self.group = config.num_attention_heads // config.num_multi_query_heads
        self.head_dim = config.head_dim
        self.vision = EVA2CLIPModel(config, vision_kernels)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def embed(self, input_ids, vision_embeds, vision_index):
        """Token embeddings with vision embeddings scattered in, flat: (B*L, H). The decoder keeps
        activations 2-D (fewer shape ops per step); only attention views them as (B, heads, L, d).

        input_ids (B, L); vision_embeds (N, H); vision_index (N, 1) flat positions b*L + l.
        """
        x = self.embed_tokens(input_ids.reshape(-1)).astype(self.compute_dtype)   # (B*L, H)
        return ops.tensor_scatter_update(x, vision_index, vision_embeds.astype(self.compute_dtype))

    def rope(self, position_ids):
        """Rotary angles at position_ids (B, L), expanded to the q and the k heads: (cos, sin) each
        (B, heads, L, d)."""
        cos, sin = self.rotary_emb(position_ids)
        return (expand_rotary(cos, sin, self.num_heads, self.compute_dtype),
                expand_rotary(cos, sin, self.num_kv_heads, self.compute_dtype))

    def layer_inputs(self, position_ids, bias, grouped=True):
        """What every layer shares: the rotary angles and the attention bias (B, 1, L, S), in the
        grouped-score layout of ``attention`` (``grouped``) or as given (the prefill attention kernel's)."""
        rope_q, rope_k = self.rope(position_ids)
        bias = bias.astype(ms.float32)
        return rope_q, rope_k, grouped_bias(bias, self.num_kv_heads, self.group) if grouped else bias

    def trace(self, input_ids, vision_embeds, vision_index, expert_mask, position_ids, bias):
        """Like ``construct`` without a cache, layer by layer (for checking against the reference):
        -> [input embeddings, input of layers 1..n-1, final norm output], each (B, L, H)."""
        shape = input_ids.shape + (self.hidden_size,)
        x = self.embed(input_ids, vision_embeds, vision_index)
        rope_q, rope_k, bias = self.layer_inputs(position_ids, bias)
        empty = ops.zeros((input_ids.shape[0], self.num_kv_heads, 0, self.head_dim), x.dtype)
        states = [x]
        for layer in self.layers:
            x, _, _ = layer(x, expert_mask, rope_q, rope_k, bias, empty, empty)
            states.append(x)
        return [h.reshape(shape) for h in states[:-1] + [self.norm(x)]]

    def construct(self, input_ids, vision_embeds, vision_index, expert_mask, position_ids, bias, past,
                  matmul=None, attend=None):
        """-> final-norm hidden states (B*L, H) and the new cache (k0, v0, k1, v1, ...). matmul: the
        decoder Linears' product (None: ops.MatMul; the decode step graph passes the rows kernel);
        attend: the attention (None: ``attention``; the CPU step graphs pass the prefill kernel)."""
        x = self.embed(input_ids, vision_embeds, vision_index)
        rope_q, rope_k, bias = self.layer_inputs(position_ids, bias, attend is None)
        new_past = ()
        for i in range(self.num_layers):
            x, key, value = self.layers[i](x, expert_mask, rope_q, rope_k, bias, past[2 * i], past[2 * i + 1],
                                           matmul, attend)
            new_past = new_past + (key, value)
        return self.norm(x), new_past

    def decode(self, input_ids, position_ids, cache, slots, cache_positions, attend, matmul=None):
        """One language token per sequence on the slot cache -> final-norm hidden states (B, H).

        input_ids, position_ids (B, 1); cache: 2 * layers slot tensors (S_slots, Hkv, C, d), (k0, v0, k1,
        ...); slots, cache_positions (B,) int32: each row's slot and where its token goes there.
        """
        x = self.embed_tokens(input_ids.reshape(-1)).astype(self.compute_dtype)   # (B, H)
        cos, sin = self.rotary_emb(position_ids)                                    # (B, 1, 1, d) each
        cos, sin = cos.reshape(-1, self.head_dim), sin.reshape(-1, self.head_dim)   # (B, d)
        for i in range(self.num_layers):
            x = self.layers[i].decode(x, cos, sin, cache[2 * i], cache[2 * i + 1], slots, cache_positions,
                                      attend, matmul)
        return self.norm(x)
