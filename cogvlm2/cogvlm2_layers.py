"""Building blocks shared by the vision tower, the adapter and the decoder.

Plain MindSpore Cells whose parameter names are the checkpoint's (``weight``, ``bias``), built from
kernels that exist on CPU and Ascend (``ops.MatMul``, ``ops.LayerNorm``, ``ops.softmax``); a caller may
hand ``Linear``, ``LayerNorm``, ``RMSNorm``, ``gelu`` and ``swiglu`` a CPU kernel instead
(``cogvlm2_cpu_kernels``). One linear, one LayerNorm, one RMSNorm, one GELU, one attention core and one
SwiGLU are used everywhere.

Two CPU facts shape the code (measured in graphs with dynamic shapes, mindspore 2.7.2):
- a 2-D ``MatMul`` with the weight stored (in, out) runs 1.3-2x faster than ``transpose_b`` or
  ``ops.dense``, so ``Linear`` keeps its weight transposed relative to the PyTorch checkpoint (the
  loader transposes; names are unchanged);
- element-wise ops that broadcast a dynamic-shape operand are 2-4x slower than same-shape ones, so
  operands are expanded with ``ops.broadcast_to`` first, and the RMSNorm mean is a mat-vec product.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from cogvlm2.cogvlm2_cpu_kernels import widen_bf16_op
from cogvlm2.cogvlm2_errors import CogVLM2ConfigError

__all__ = ["Linear", "LayerNorm", "RMSNorm", "Embedding", "attention", "swiglu", "gelu", "to_ms_dtype",
           "placeholder", "parameter_dtype", "widened", "grouped_bias", "BF16_BITS"]

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def to_ms_dtype(name) -> ms.dtype.Type:
    """'float32' / 'float16' / 'bfloat16' (or a mindspore dtype) -> mindspore dtype."""
    if isinstance(name, ms.dtype.Type):
        return name
    if name not in _DTYPES:
        raise CogVLM2ConfigError(f"dtype {name!r} is not one of {sorted(_DTYPES)}; set compute_dtype/param_init_type to one of them")
    return _DTYPES[name]


# A Linear weight or the token embedding kept in bfloat16 on CPU: its bit patterns (MindSpore 2.7.2's CPU
# kernels have no bfloat16).
BF16_BITS = ms.uint16


def parameter_dtype(dtype, as_bits: bool = False) -> ms.dtype.Type:
    """The dtype a parameter of ``dtype`` (param_init_type) is kept in. bfloat16 on CPU, where MindSpore
    2.7.2's kernels refuse it (Identity, Gather, Transpose): a parameter that only bit-reading kernels use
    (``as_bits``: a Linear weight, for the CPU kernels' products; the token embedding, gathered as uint16
    and its rows widened) keeps its bfloat16 bit patterns (``BF16_BITS``), widened exactly where read, so
    the results are those of float32 parameters with the same values, from half the bytes; every other
    parameter (norms, biases, convolutions, positions, learned tokens: 0.1% of the real model's values) is
    float32, which holds bfloat16 values exactly. Elsewhere: ``dtype``."""
    dtype = to_ms_dtype(dtype)
    if dtype != ms.bfloat16 or ms.get_context("device_target") != "CPU":
        return dtype
    return BF16_BITS if as_bits else ms.float32


def placeholder(shape, dtype, as_bits: bool = False) -> Tensor:
    """Lazily-initialised zeros for a parameter made for ``dtype`` (kept as ``parameter_dtype`` says): no
    memory until used, so the real config's shapes can be built without its 50 GB. Every parameter is
    overwritten by a checkpoint, and loading fails on a missing one, so no placeholder value is ever used
    for real numbers."""
    return initializer("zeros", shape, parameter_dtype(dtype, as_bits))


def widened(x, widen, after=None):
    """x's float32 values: ``widen`` (``widen_bf16_op``) of bfloat16 bits, or x itself if ``widen`` is None.

    ``after``: a tensor the widening waits for (the product's input). A weight's widening depends on nothing
    computed, so a graph may run all of them at its start and hold every float32 copy at once (the bench
    prefill held 62 MB per layer and the lm_head's 525 MB: the real model's 32 layers would hold 28 GB);
    after its input, each copy lives only for its own product."""
    if widen is None:
        return x
    return widen(x if after is None else ops.depend(x, after))


class Linear(nn.Cell):
    """y = x W + b over the last axis. weight is stored (in, out): the transpose of the PyTorch
    checkpoint's (out, in), which the loader applies (``transposed_in_checkpoint``).

    ``kernel``: a primitive ``(x (N, in), W (in, out)) -> (N, out)`` this Linear uses instead of
    ``ops.MatMul`` (the vision tower's get the AMX kernel, ``cogvlm2_cpu_kernels``); ``biased``: a primitive
    ``(x, W, b (out,)) -> x W + b`` a Linear with a bias uses instead of its product and ``bias_add``.
    ``construct(x, matmul=None)``: ``matmul``, the same kind of primitive as ``kernel``, replaces both for
    this call; the step graphs pass theirs (the rows kernel, the AMX kernel) down through the decoder.
    A weight kept as bfloat16 bits (``parameter_dtype``) goes to those kernels as it is, which read the
    bits; ``ops.MatMul`` gets its float32 values (``float_weight``).
    """

    transposed_in_checkpoint = ("weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=ms.float32, kernel=None,
                 biased=None):
        super().__init__()
        self.out_features = out_features
        self.weight = Parameter(placeholder((in_features, out_features), dtype, as_bits=True), name="weight")
        self.bias = Parameter(placeholder((out_features,), dtype), name="bias") if bias else None
        self.matmul = ops.MatMul()
        self.kernel = kernel
        self.biased = biased if bias else None
        self.widen = widen_bf16_op() if self.weight.dtype == BF16_BITS else None

    def float_weight(self, after=None):
        """The weight's float32 values for ``ops.MatMul``: (in, out), widened after ``after`` (``widened``)."""
        return widened(self.weight, self.widen, after)

    def construct(self, x, matmul=None):
        if x.ndim == 2:                                                  # (N, in): no reshapes
            return self._matmul(x, matmul)
        shape = x.shape
        return self._matmul(x.reshape(-1, shape[-1]), matmul).reshape(shape[:-1] + (self.out_features,))

    def fused(self, kernel, x, operands=()):
        """``kernel(x (N, in), weight, bias, *operands) -> (N, out)`` on x's rows, reshaped back to x's leading
        axes: a kernel that does this Linear and the step after it in one pass (``VisionKernels.linear_gelu``,
        ``linear_norm_add``); ``operands`` are (N, ...) or per-feature, as the kernel takes them."""
        shape = x.shape
        y = kernel(x.reshape(-1, shape[-1]), self.weight, self.bias, *operands)      # (N, out)
        return y.reshape(shape[:-1] + (self.out_features,))

    def _matmul(self, x, matmul):
        if matmul is None and self.biased is not None:
            return self.biased(x, self.weight, self.bias)                # (N, out), bias added in the kernel
        if matmul is not None:
            y = matmul(x, self.weight)                                   # (N, out)
        elif self.kernel is not None:
            y = self.kernel(x, self.weight)
        else:
            y = self.matmul(x, self.float_weight(x))
        return y if self.bias is None else ops.bias_add(y, self.bias)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with ``weight``/``bias``: ``kernel`` ((x, weight, bias, eps (1,)) -> y,
    ``cogvlm2_cpu_kernels.layer_norm_op``) if given, else the classic ops.LayerNorm (CPU has no
    LayerNormExt)."""

    def __init__(self, size: int, eps: float, dtype=ms.float32, kernel=None):
        super().__init__()
        self.weight = Parameter(placeholder((size,), dtype), name="weight")
        self.bias = Parameter(placeholder((size,), dtype), name="bias")
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.kernel = kernel
        self.epsilon = Tensor(np.array([eps], np.float32))

    def construct(self, x):
        if self.kernel is None:
            return self.layer_norm(x, self.weight, self.bias)[0]
        return self.kernel(x, self.weight, self.bias, self.epsilon)


class RMSNorm(nn.Cell):
    """Llama RMSNorm computed in float32: x * rsqrt(mean(x^2) + eps) * weight; ``kernel`` ((x, weight,
    eps (1,)) -> y, ``cogvlm2_cpu_kernels.rms_norm_op``) if given."""

    def __init__(self, size: int, eps: float, dtype=ms.float32, kernel=None):
        super().__init__()
        self.weight = Parameter(placeholder((size,), dtype), name="weight")
        self.eps = eps
        self.mean_vector = Tensor(np.full((size, 1), 1.0 / size, np.float32))  # mean = x^2 @ (1/n)
        self.matmul = ops.MatMul()
        self.kernel = kernel
        self.epsilon = Tensor(np.array([eps], np.float32))

    def construct(self, x):
        """x: (N, H) -> (N, H)."""
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.epsilon)
        dtype = x.dtype
        x = x.astype(ms.float32)
        variance = self.matmul(ops.square(x), self.mean_vector)             # (N, 1)
        x = x * ops.broadcast_to(ops.rsqrt(variance + self.eps), x.shape)
        x = x * ops.broadcast_to(self.weight.astype(ms.float32), x.shape)
        return x.astype(dtype)


class Embedding(nn.Cell):
    """Embedding table ``weight`` (vocab, hidden). ``as_bits``: a table only ever gathered (the token
    embedding) may be kept as bfloat16 bits (``parameter_dtype``): the gathered rows are widened."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype=ms.float32, as_bits: bool = False):
        super().__init__()
        self.weight = Parameter(placeholder((vocab_size, hidden_size), dtype, as_bits), name="weight")
        self.widen = widen_bf16_op() if self.weight.dtype == BF16_BITS else None

    def construct(self, ids):
        return widened(ops.gather(self.weight, ids, 0), self.widen)     # (N, hidden)


_batch_matmul = ops.BatchMatMul()
_batch_matmul_nt = ops.BatchMatMul(transpose_b=True)   # q k^T without materialising k^T


def grouped_bias(bias, kv_heads: int, group: int):
    """Additive mask (B, 1, L, S) -> (B, Hkv, g*L, S), the layout of ``attention``'s scores; built
    once per forward pass and shared by every layer."""
    b, _, length, s = bias.shape
    return ops.broadcast_to(bias.reshape(b, 1, 1, length, s), (b, kv_heads, group, length, s)) \
        .reshape(b, kv_heads, group * length, s)


def attention(q, k, v, bias, scale: float):
    """Softmax attention with grouped KV heads, without copying K/V per query head.

    q: (B, Hq, L, d); k, v: (B, Hkv, S, d) with Hq = g * Hkv (query head h uses kv head h // g);
    bias: ``grouped_bias`` output (B, Hkv, g*L, S), or None. Returns (B, Hq, L, d).
    Scores and softmax are float32.
    """
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    q = (q * scale).reshape(b, hkv, hq // hkv * length, d)          # (B, Hkv, g*L, d)
    scores = _batch_matmul_nt(q, k).astype(ms.float32)             # (B, Hkv, g*L, S)
    if bias is not None:
        scores = scores + bias
    probs = ops.softmax(scores, -1).astype(v.dtype)
    out = _batch_matmul(probs, v)                                   # (B, Hkv, g*L, d)
    return out.reshape(b, hq, length, d)


def gelu(x, kernel=None):
    """Exact (erf) GELU: ``kernel`` (``cogvlm2_cpu_kernels.gelu_op``) if given, else ops.gelu."""
    if kernel is None:
        return ops.gelu(x, approximate="none")
    return kernel(x)


def swiglu(x, gate_proj, up_proj, down_proj, matmul=None, silu_mul=None, gated=None):
    """down(silu(gate(x)) * up(x)): the Llama MLP and the adapter GLU share this (``matmul``: see Linear;
    ``silu_mul``: (gate, up) -> silu(gate) * up in one kernel, ``cogvlm2_cpu_kernels.silu_mul_op``;
    ``gated``: (x (N, in), W_gate, W_up) -> silu(x W_gate) * (x W_up), both products and that step in one
    kernel, ``amx_gated_op``, used while gate and up are plain Linears without bias: a LoRA layer keeps
    its own forward)."""
    if gated is not None and isinstance(gate_proj, Linear) and isinstance(up_proj, Linear) \
            and gate_proj.bias is None and up_proj.bias is None:
        shape = x.shape
        hidden = gated(x.reshape(-1, shape[-1]), gate_proj.weight, up_proj.weight)        # (N, inner)
        return down_proj(hidden.reshape(shape[:-1] + (gate_proj.out_features,)), matmul)
    gate, up = gate_proj(x, matmul), up_proj(x, matmul)
    return down_proj(ops.silu(gate) * up if silu_mul is None else silu_mul(gate, up), matmul)
