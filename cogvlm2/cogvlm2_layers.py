"""Building blocks shared by the vision tower, the adapter and the decoder.

Plain MindSpore Cells whose parameter names are the checkpoint's (``weight``, ``bias``), built only
from kernels that exist on CPU and Ascend (``ops.dense``, ``ops.LayerNorm``, ``ops.matmul``,
``ops.softmax``). One linear, one LayerNorm, one RMSNorm, one attention core and one SwiGLU are used
everywhere.
"""
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

__all__ = ["Linear", "LayerNorm", "RMSNorm", "Embedding", "attention", "swiglu", "to_ms_dtype", "placeholder"]

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def to_ms_dtype(name) -> ms.dtype.Type:
    """'float32' / 'float16' / 'bfloat16' (or a mindspore dtype) -> mindspore dtype."""
    if isinstance(name, ms.dtype.Type):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def placeholder(shape, dtype) -> Tensor:
    """Lazily-initialised zeros for a parameter: no memory until used, so the real config's shapes can
    be built without its 50 GB. Every parameter is overwritten by a checkpoint, and loading fails on a
    missing one, so no placeholder value is ever used for real numbers."""
    return initializer("zeros", shape, dtype)


class Linear(nn.Cell):
    """y = x W^T + b with the PyTorch layout: weight (out, in), optional bias (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(placeholder((out_features, in_features), dtype), name="weight")
        self.bias = Parameter(placeholder((out_features,), dtype), name="bias") if bias else None

    def construct(self, x):
        return ops.dense(x, self.weight, self.bias)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with ``weight``/``bias`` (CPU has no LayerNormExt, so the classic op)."""

    def __init__(self, size: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(placeholder((size,), dtype), name="weight")
        self.bias = Parameter(placeholder((size,), dtype), name="bias")
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        return self.layer_norm(x, self.weight, self.bias)[0]


class RMSNorm(nn.Cell):
    """Llama RMSNorm computed in float32: x * rsqrt(mean(x^2) + eps) * weight."""

    def __init__(self, size: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(placeholder((size,), dtype), name="weight")
        self.eps = eps

    def construct(self, x):
        dtype = x.dtype
        x = x.astype(ms.float32)
        variance = ops.mean(ops.square(x), -1, keep_dims=True)
        x = x * ops.rsqrt(variance + self.eps)
        return (self.weight.astype(ms.float32) * x).astype(dtype)


class Embedding(nn.Cell):
    """Token embedding table ``weight`` (vocab, hidden)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(placeholder((vocab_size, hidden_size), dtype), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


def attention(q, k, v, bias, scale: float):
    """Softmax attention with grouped KV heads, without copying K/V per query head.

    q: (B, Hq, L, d); k, v: (B, Hkv, S, d) with Hq = g * Hkv (query head h uses kv head h // g);
    bias: additive mask broadcastable to (B, 1, L, S), or None. Returns (B, Hq, L, d).
    Scores and softmax are float32.
    """
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    q = q.reshape(b, hkv, group * length, d)                        # (B, Hkv, g*L, d)
    scores = ops.matmul(q, k.swapaxes(-1, -2)).astype(ms.float32) * scale  # (B, Hkv, g*L, S)
    if bias is not None:
        s = scores.shape[-1]
        scores = scores.reshape(b, hkv, group, length, s) + bias.reshape(b, 1, 1, length, s)
        scores = scores.reshape(b, hkv, group * length, s)
    probs = ops.softmax(scores, -1).astype(v.dtype)
    out = ops.matmul(probs, v)                                      # (B, Hkv, g*L, d)
    return out.reshape(b, hq, length, d)


def swiglu(x, gate_proj, up_proj, down_proj):
    """down(silu(gate(x)) * up(x)): the Llama MLP and the adapter GLU share this."""
    return down_proj(ops.silu(gate_proj(x)) * up_proj(x))
