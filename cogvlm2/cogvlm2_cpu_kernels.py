"""The CPU kernels: MindSpore "aot" Custom ops built from ``kernels/*.cc`` into one library.

- ``rows_matmul_op()``: ``x (M, K) @ w (K, N)`` streaming each weight once for up to 16 rows
  (``kernels/rows_matmul.cc``). MindSpore 2.7.2's CPU MatMul (oneDNN 2.2 gemm) reads the weight once
  only for a single row; for 2-15 rows it packs or re-reads it, so a memory-bound decode step of 8
  sequences cost 2-3.4x that of one (README, "Batched decode and the CPU MatMul kernels"). Used only by
  the decode graphs, never for prefill, where oneDNN's GEMM is the right kernel.
- ``decode_attention_op()``: one decode token per row against the slot KV cache, written in place
  (``kernels/decode_attention.cc``, ``cogvlm2_kv_cache``): the functional cache's concat copied every
  row's whole cache every step, the largest cost that grew with the batch.
- ``gelu_op()`` / ``layer_norm_op()``: the vision tower's and the adapter's exact GELU and LayerNorm in
  one pass each (``kernels/gelu.cc``, ``kernels/layer_norm.cc``), computed in double and rounded once;
  MindSpore 2.7.2 runs GELU as four kernels with a scalar erf and its CPU LayerNorm slowly (together
  26% of the bench model's tower).
- ``vision_attention_op(heads)``: the tower's attention straight from its fused qkv projection, one
  task per frame and head (``kernels/vision_attention.cc``), instead of split, four transposes, two
  BatchMatMuls and a softmax.
  These three kernels' gradients (``bprop``) are MindSpore ops, so a training graph with the tower in
  it differentiates through them.
- ``prefill_attention_op()``: the decoder's attention on the functional cache for any number of new
  tokens (``kernels/prefill_attention.cc``): one task per sequence and kv head on the vision kernel's
  core (``kernels/attention_core.h``), each block of query rows stopping at its last visible key, instead
  of the grouped bias, two BatchMatMuls, an add and a softmax over every key. Only the inference step
  graphs use it (no gradient).
- ``rms_norm_op()`` / ``silu_mul_op()``: the decoder's RMSNorm and SwiGLU's silu(gate) * up (also the
  adapter's) in one pass each (``kernels/rms_norm.cc``, ``kernels/silu_mul.cc``) instead of eight and two
  MindSpore kernels; differentiable.
- ``amx_matmul_op()``: ``x (M, K) @ w (K, N)`` of many rows (the vision tower, the adapter, prefill) on
  the AMX bf16 tile unit at float32 accuracy: each float32 is split into three bfloat16 parts and the
  six significant part products are summed in float32 (``kernels/amx_matmul.cc``); fewer than 16 rows
  go to the rows kernel. Differentiable (its gradient is two MindSpore MatMuls). ``amx_linear_op()``: the
  same with a Linear's bias added as the sums are stored (the vision tower's biased Linears);
  ``amx_linear_gelu_op()``: then GELU (the tower's fc1 and its GELU); ``amx_linear_norm_add_op()``: then a
  residual plus the LayerNorm (the end of each branch of a tower layer). Their GELU and LayerNorm are
  ``gelu_op``'s and ``layer_norm_op``'s, run on the vector units under the next block's tile products, so
  each fused kernel gives the bits of the kernels it replaces; differentiable (MindSpore ops).
  ``amx_gated_op()``: SwiGLU's gate and up products and ``silu_mul_op``'s step in one kernel, the same bits
  (the adapter's GLU); differentiable.
- Linear weights kept in bfloat16 (``param_init_type: bfloat16`` on CPU) reach the kernels as their bit
  patterns (uint16: MindSpore 2.7.2's CPU kernels have no bfloat16). ``rows_matmul_op`` and the AMX ops
  also take w (w_gate, w_up) that way and widen each value exactly as they read it: the same bits as
  float32 weights holding those values, half the bytes to read. ``widen_bf16_op()``: the bits -> float32,
  for MindSpore's MatMul where no kernel reads them (``kernels/widen_bf16.cc``).
- ``patchify_op()``: frames -> their non-overlapping p x p patches as rows (``kernels/patchify.cc``), so the
  tower's patch convolution (stride = kernel) runs as one AMX Linear; differentiable.
- ``resolve_decode_matmul`` / ``resolve_kv_cache`` / ``resolve_vision_kernels`` /
  ``resolve_decoder_kernels`` / ``resolve_gemm``: a config value -> what runs ("auto": the kernels on a
  float32 CPU model when they build, the portable ops elsewhere; for ``gemm`` also only on a CPU with
  AMX-BF16 that Linux lets the process use).

The library is compiled with g++ at first use into a per-user cache, named by a hash of the sources,
flags, compiler and CPU, and renamed into place atomically, so concurrent first uses and other machines
sharing a home cannot clash. A build failure is one CogVLM2ConfigError line (which compiler, the first
error line, what to set).
"""
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import mindspore as ms
from mindspore import ops
from mindspore.ops import CustomRegOp, DataType

from cogvlm2.cogvlm2_errors import CogVLM2ConfigError

__all__ = ["DECODE_MATMUL_CHOICES", "KV_CACHE_CHOICES", "VISION_KERNELS_CHOICES", "ROWS_PER_PASS",
           "GEMM_CHOICES", "DECODER_KERNELS_CHOICES", "KERNEL_THREADS_CHOICES", "resolve_decode_matmul",
           "resolve_kv_cache", "resolve_vision_kernels", "resolve_decoder_kernels", "resolve_gemm",
           "resolve_kernel_threads", "set_kernel_threads", "pinned_kernel_threads", "rows_matmul_op",
           "decode_attention_op", "gelu_op", "layer_norm_op", "vision_attention_op", "prefill_attention_op",
           "rms_norm_op", "silu_mul_op", "amx_matmul_op", "amx_linear_op", "amx_linear_gelu_op",
           "amx_linear_norm_add_op", "amx_gated_op", "patchify_op", "widen_bf16_op", "amx_available",
           "build_library"]

DECODE_MATMUL_CHOICES = ("auto", "onednn", "rows")
KV_CACHE_CHOICES = ("auto", "concat", "slots")
VISION_KERNELS_CHOICES = ("auto", "ops", "fused")
GEMM_CHOICES = ("auto", "onednn", "amx")
DECODER_KERNELS_CHOICES = ("auto", "ops", "fused")
KERNEL_THREADS_CHOICES = ("auto", "pinned", "free")
ROWS_PER_PASS = 16          # rows the kernel keeps in registers per pass over the weight (kMaxRows)
KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
SOURCES = tuple(os.path.join(KERNELS, name)
                for name in ("rows_matmul.cc", "decode_attention.cc", "gelu.cc", "layer_norm.cc",
                             "vision_attention.cc", "prefill_attention.cc", "rms_norm.cc", "silu_mul.cc",
                             "amx_matmul.cc", "patchify.cc", "kernel_threads.cc", "widen_bf16.cc"))
HEADERS = tuple(os.path.join(KERNELS, name) for name in ("cpu_common.h", "attention_core.h", "gelu.h",
                                                               "layer_norm.h", "silu.h"))
# -march=native: the library is built on the machine that runs it (the cache key includes the CPU flags).
# No OpenMP: the kernels run on MindSpore's own kernel threads (cpu_common.h), else on a few worker
# threads that sleep on a condition variable between calls, so nothing spins beside MindSpore's pool.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
LIBS = ("-ldl",)      # dlopen/dlsym: the kernels find MindSpore's thread pool at run time (cpu_common.h)
FIX = ("set model_config decode_matmul: onednn, kv_cache: concat, vision_kernels: ops, decoder_kernels: ops, "
       "gemm: onednn, kernel_threads: free and param_init_type: float32 to run without it")

_logger = logging.getLogger(__name__)
_ops = {}


def cache_dir() -> str:
    """Per-user folder for compiled kernels ($COGVLM2_CACHE, else $XDG_CACHE_HOME or ~/.cache, /cogvlm2)."""
    root = os.environ.get("COGVLM2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cogvlm2")
    return os.path.join(root, "kernels")


def _compiler() -> str:
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise CogVLM2ConfigError(f"the CPU kernels need a C++ compiler, but {compiler!r} is not on PATH; "
                                 f"install g++ (apt-get install -y g++) or {FIX}")
    return compiler


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build_library() -> str:
    """Compile ``kernels/*.cc`` into one library unless the cache has it; -> the .so path."""
    compiler = _compiler()
    contents = []
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            contents.append(f.read())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join(contents + [" ".join(FLAGS + LIBS).encode(), version.encode(),
                                                _cpu_flags().encode()])).hexdigest()[:16]
    folder = cache_dir()
    path = os.path.join(folder, f"cogvlm2_kernels-{key}.so")
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=folder)
        os.close(fd)
    except OSError as error:
        raise CogVLM2ConfigError(f"cannot write the compiled CPU kernels to {folder}: {error.strerror}; "
                                 f"set COGVLM2_CACHE to a writable folder or {FIX}") from None
    try:
        result = subprocess.run([compiler, *FLAGS, "-I", KERNELS, "-o", tmp, *SOURCES, *LIBS],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise CogVLM2ConfigError(f"{compiler} could not build the CPU kernels: {first.strip()[:300]}; "
                                     f"{FIX}")
        os.replace(tmp, path)          # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _custom(name: str, inputs, bprop=None, key=None, weights=()):
    """The float32-output Custom primitive ``name`` of the library, built once per process (per ``key``
    if given). ``inputs``: (name, DataType) pairs; ``weights``: the names among them that may also be
    bfloat16 bit patterns (uint16), a second dtype format; ``bprop``: its gradient (inputs..., out, dout) ->
    one gradient per input (float32 weights only: the bfloat16 ones are for inference).
    Output shapes come from the library's ``<name>InferShape``, which the dynamic-shape runtime needs
    (a Python out_shape fails there with "The prim is not a PrimitivePy"); reg_info names the op, which
    that runtime looks the op up by (without it: "The pointer[value] is null")."""
    key = key or name
    if key not in _ops:
        library = build_library()
        reg = CustomRegOp(name)
        for index, (input_name, _) in enumerate(inputs):
            reg = reg.input(index, input_name)
        reg = reg.output(0, "y").dtype_format(*[dtype for _, dtype in inputs], DataType.F32_Default)
        if weights:
            reg = reg.dtype_format(*[DataType.U16_Default if input_name in weights else dtype
                                     for input_name, dtype in inputs], DataType.F32_Default)
        info = reg.target("CPU").get_op_info()
        _ops[key] = ops.Custom(f"{library}:{name}", out_shape=None, out_dtype=ms.float32,
                               func_type="aot", bprop=bprop, reg_info=info)
    return _ops[key]


def rows_matmul_op():
    """``(x (M, K), w (K, N)) -> (M, N)`` float32 (w float32 or bfloat16 bits), dynamic shapes
    (``kernels/rows_matmul.cc``)."""
    return _custom("RowsMatMul", [("x", DataType.F32_Default), ("w", DataType.F32_Default)], weights=("w",))


def decode_attention_op():
    """``(qkv (B, (Hq + 2 Hkv) d), cos, sin (B, d), scale (1,), k_cache, v_cache (S, Hkv, C, d), slots (B,),
    positions (B,)) -> (B, Hq d)`` float32: rotates q and k (rotate-half) and scales q, writes k, v into the
    caches at (slot, position), then attends over each slot's positions 0..position
    (``kernels/decode_attention.cc``)."""
    f32, i32 = DataType.F32_Default, DataType.I32_Default
    return _custom("DecodeAttention", [("qkv", f32), ("cos", f32), ("sin", f32), ("scale", f32), ("k_cache", f32),
                                       ("v_cache", f32), ("slots", i32), ("positions", i32)])


def gelu_op():
    """``x -> GELU(x)`` (exact, erf) float32, any shape (``kernels/gelu.cc``); differentiable."""
    return _custom("FusedGelu", [("x", DataType.F32_Default)], _gelu_bprop)


def layer_norm_op():
    """``(x (..., C), weight (C,), bias (C,), eps (1,)) -> (..., C)`` float32: LayerNorm over the last
    axis (``kernels/layer_norm.cc``); differentiable in x, weight and bias."""
    f32 = DataType.F32_Default
    return _custom("FusedLayerNorm", [("x", f32), ("weight", f32), ("bias", f32), ("eps", f32)],
                   _layer_norm_bprop)


def vision_attention_op(heads: int):
    """``(qkv (T, L, 3C), heads (1,) int32) -> (T, L, C)`` float32: per frame and head, softmax((q d^-0.5)
    k^T) v with q, k, v the thirds of qkv and head h at columns h*d .. (h+1)*d of each (d = C / heads)
    (``kernels/vision_attention.cc``); differentiable in qkv. One primitive per head count, which its
    gradient needs as a constant."""
    return _custom("VisionAttention", [("qkv", DataType.F32_Default), ("heads", DataType.I32_Default)],
                   _vision_attention_bprop(heads), key=f"VisionAttention/{heads}")


def prefill_attention_op():
    """``(q (B, Hq, L, d), k, v (B, Hkv, S, d), bias (B, 1, L, S)) -> (B, L, Hq * d)`` float32: per sequence
    and query head h (kv head h / (Hq / Hkv)), softmax((q d^-0.5) k^T + bias) v, dynamic shapes
    (``kernels/prefill_attention.cc``). Keys a bias at or below -1e8 masks get no weight, as in the portable
    softmax. No gradient: the training graphs keep the portable attention."""
    f32 = DataType.F32_Default
    return _custom("PrefillAttention", [("q", f32), ("k", f32), ("v", f32), ("bias", f32)])


def rms_norm_op():
    """``(x (..., H), weight (H,), eps (1,)) -> (..., H)`` float32: x * rsqrt(mean(x^2) + eps) * weight over
    the last axis (``kernels/rms_norm.cc``); differentiable in x and weight."""
    f32 = DataType.F32_Default
    return _custom("FusedRMSNorm", [("x", f32), ("weight", f32), ("eps", f32)], _rms_norm_bprop)


def silu_mul_op():
    """``(gate, up) -> silu(gate) * up`` float32, element-wise, any shape (``kernels/silu_mul.cc``);
    differentiable."""
    f32 = DataType.F32_Default
    return _custom("SiluMul", [("gate", f32), ("up", f32)], _silu_mul_bprop)


def amx_matmul_op():
    """``(x (M, K), w (K, N)) -> (M, N)`` float32 on the AMX tile unit, float32 accuracy, dynamic shapes
    (``kernels/amx_matmul.cc``); differentiable in x and w. Only where ``amx_available()``."""
    f32 = DataType.F32_Default
    return _custom("AmxMatMul", [("x", f32), ("w", f32)], _matmul_bprop, weights=("w",))


def amx_linear_op():
    """``(x (M, K), w (K, N), bias (N,)) -> x @ w + bias`` (M, N) float32: ``amx_matmul_op`` with the bias
    added as the sums are stored, one kernel instead of a product and a BiasAdd (``kernels/amx_matmul.cc``);
    differentiable in x, w and bias. Only where ``amx_available()``."""
    f32 = DataType.F32_Default
    return _custom("AmxLinear", [("x", f32), ("w", f32), ("bias", f32)], _linear_bprop, weights=("w",))


def amx_linear_gelu_op():
    """``(x (M, K), w (K, N), bias (N,)) -> GELU(x @ w + bias)`` (M, N) float32: ``amx_linear_op`` and
    ``gelu_op`` in one kernel, the same bits (``kernels/amx_matmul.cc``); differentiable in x, w and bias.
    Only where ``amx_available()``."""
    f32 = DataType.F32_Default
    return _custom("AmxLinearGelu", [("x", f32), ("w", f32), ("bias", f32)], _linear_gelu_bprop, weights=("w",))


def amx_linear_norm_add_op():
    """``(x (M, K), w (K, N), bias (N,), norm_weight (N,), norm_bias (N,), eps (1,), residual (M, N)) ->
    residual + LayerNorm(x @ w + bias)`` (M, N) float32: ``amx_linear_op``, ``layer_norm_op`` and the add
    in one kernel, the same bits (``kernels/amx_matmul.cc``); differentiable in all but eps. Only where
    ``amx_available()``."""
    f32 = DataType.F32_Default
    return _custom("AmxLinearNormAdd", [("x", f32), ("w", f32), ("bias", f32), ("norm_weight", f32),
                                        ("norm_bias", f32), ("eps", f32), ("residual", f32)],
                   _linear_norm_add_bprop, weights=("w",))


def amx_gated_op():
    """``(x (M, K), w_gate (K, N), w_up (K, N)) -> silu(x @ w_gate) * (x @ w_up)`` (M, N) float32: two
    ``amx_matmul_op`` products and ``silu_mul_op`` in one kernel, the same bits, without writing either
    product out (``kernels/amx_matmul.cc``); differentiable in x, w_gate and w_up. Only where
    ``amx_available()``."""
    f32 = DataType.F32_Default
    return _custom("AmxGated", [("x", f32), ("w_gate", f32), ("w_up", f32)], _gated_bprop,
                   weights=("w_gate", "w_up"))


def patchify_op():
    """``(images (T, C, H, W), size (p,)) -> (T * H/p * W/p, C * p * p)`` float32: each frame's p x p patches as
    rows in raster order, each row's values in (c, ky, kx) order, a convolution weight's (out, C, p, p)
    order (``kernels/patchify.cc``). size's length is the patch size (its values are unused: the output
    shape is inferred from shapes). Differentiable in images."""
    f32 = DataType.F32_Default
    return _custom("Patchify", [("images", f32), ("size", f32)], _patchify_bprop)


def widen_bf16_op():
    """``bits (any shape) uint16 -> float32``: the values of bfloat16 weights held as their bit patterns,
    exact (``kernels/widen_bf16.cc``). No gradient: bfloat16 weights are for inference."""
    return _custom("WidenBf16", [("bits", DataType.U16_Default)])


@functools.lru_cache(maxsize=None)
def amx_available() -> bool:
    """Whether the library has the AMX path and this process may use the tile registers (the CPU has
    AMX-BF16 and Linux grants the tile state; the grant is process-wide and the kernel needs it)."""
    return bool(ctypes.CDLL(build_library()).AmxMatMulAvailable())


_matmul_nt = ops.MatMul(transpose_b=True)
_matmul_tn = ops.MatMul(transpose_a=True)


def _matmul_bprop(x, w, out, dout):
    """y = x w: dx = dout w^T, dw = x^T dout."""
    return _matmul_nt(dout, w), _matmul_tn(x, dout)


def _linear_bprop(x, w, bias, out, dout):
    """y = x w + b: dx = dout w^T, dw = x^T dout, db = dout summed over rows."""
    return _matmul_nt(dout, w), _matmul_tn(x, dout), dout.sum(0)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_bprop(x, out, dout):
    """d GELU / dx = Phi(x) + x phi(x)."""
    cdf = 0.5 * (1.0 + ops.erf(x * _SQRT_HALF))
    pdf = ops.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return (dout * (cdf + x * pdf),)


def _layer_norm_bprop(x, weight, bias, eps, out, dout):
    """LayerNorm's gradients: x (..., C) through the mean and variance, weight and bias summed over rows."""
    centred = x - x.mean(-1, keep_dims=True)
    rstd = ops.rsqrt((centred * centred).mean(-1, keep_dims=True) + eps)
    normed = centred * rstd                                                     # (..., C)
    g = dout * weight
    dx = rstd * (g - g.mean(-1, keep_dims=True) - normed * (g * normed).mean(-1, keep_dims=True))
    size = x.shape[-1]
    dweight = (dout * normed).reshape(-1, size).sum(0)                          # (C,)
    dbias = dout.reshape(-1, size).sum(0)
    return dx, dweight, dbias, ops.zeros_like(eps)


def _linear_gelu_bprop(x, w, bias, out, dout):
    """y = GELU(z), z = x w + b recomputed: the GELU's gradient, then the Linear's."""
    z = ops.bias_add(ops.matmul(x, w), bias)
    return _linear_bprop(x, w, bias, z, _gelu_bprop(z, out, dout)[0])


def _linear_norm_add_bprop(x, w, bias, norm_weight, norm_bias, eps, residual, out, dout):
    """y = r + LayerNorm(z), z = x w + b recomputed: the LayerNorm's gradients, then the Linear's; dr = dout."""
    z = ops.bias_add(ops.matmul(x, w), bias)
    dz, dweight, dbias, deps = _layer_norm_bprop(z, norm_weight, norm_bias, eps, out, dout)
    return _linear_bprop(x, w, bias, z, dz) + (dweight, dbias, deps, dout)


def _gated_bprop(x, w_gate, w_up, out, dout):
    """y = silu(g) * u, g = x w_gate and u = x w_up recomputed: silu_mul's gradients, then both products'."""
    dgate, dup = _silu_mul_bprop(ops.matmul(x, w_gate), ops.matmul(x, w_up), out, dout)
    return _matmul_nt(dgate, w_gate) + _matmul_nt(dup, w_up), _matmul_tn(x, dgate), _matmul_tn(x, dup)


def _patchify_bprop(images, size, out, dout):
    """The patches' gradient put back where each value came from."""
    t, c, h, w = images.shape
    p = size.shape[0]
    d_images = dout.reshape(t, h // p, w // p, c, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(t, c, h, w)
    return d_images, ops.zeros_like(size)


def _rms_norm_bprop(x, weight, eps, out, dout):
    """y = x r w with r = (mean(x^2) + eps)^-1/2: dx = r g - r^3 x mean(g x) with g = dout w; dweight is
    dout x r summed over rows."""
    rstd = ops.rsqrt((x * x).mean(-1, keep_dims=True) + eps)
    g = dout * weight
    dx = rstd * g - rstd * rstd * rstd * x * (g * x).mean(-1, keep_dims=True)
    size = x.shape[-1]
    dweight = (dout * x * rstd).reshape(-1, size).sum(0)
    return dx, dweight, ops.zeros_like(eps)


def _silu_mul_bprop(gate, up, out, dout):
    """y = g s(g) u: dgate = dout u s (1 + g (1 - s)), dup = dout g s, s the sigmoid."""
    sigmoid = ops.sigmoid(gate)
    return dout * up * sigmoid * (1 + gate * (1 - sigmoid)), dout * gate * sigmoid


_batch_matmul = ops.BatchMatMul()
_batch_matmul_nt = ops.BatchMatMul(transpose_b=True)
_batch_matmul_tn = ops.BatchMatMul(transpose_a=True)


def _vision_attention_bprop(heads: int):
    """The attention's gradient in qkv, recomputing the probabilities (q scaled as in the forward):
    dv = P^T dO, dS = P * (dO v^T - rowsum(dO v^T * P)), dq = dS k * scale, dk = dS^T (q * scale)."""
    def bprop(qkv, heads_tensor, out, dout):
        length, width = qkv.shape[1], qkv.shape[2]
        d = width // 3 // heads
        scale = d ** -0.5
        split = qkv.reshape(-1, length, 3, heads, d).transpose(2, 0, 3, 1, 4)    # (3, T, heads, L, d)
        q, k, v = split[0] * scale, split[1], split[2]
        probs = ops.softmax(_batch_matmul_nt(q, k), -1)                           # (T, heads, L, L)
        d_out = dout.reshape(-1, length, heads, d).swapaxes(1, 2)                 # (T, heads, L, d)
        d_v = _batch_matmul_tn(probs, d_out)
        d_probs = _batch_matmul_nt(d_out, v)
        d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True))
        d_q = _batch_matmul(d_scores, k) * scale
        d_k = _batch_matmul_tn(d_scores, q)
        d_qkv = ops.stack((d_q, d_k, d_v)).transpose(1, 3, 0, 2, 4).reshape(-1, length, width)
        return d_qkv, ops.zeros_like(heads_tensor)
    return bprop


def resolve_decode_matmul(choice: str, device_target: str, compute_dtype: str = "float32") -> str:
    """The config value -> "rows" (``rows_matmul_op``) or "onednn" (ops.MatMul)."""
    return _resolve("decode_matmul", choice, DECODE_MATMUL_CHOICES, "rows", "onednn", rows_matmul_op,
                    device_target, compute_dtype)


def resolve_kv_cache(choice: str, device_target: str, compute_dtype: str = "float32") -> str:
    """The config value -> "slots" (the engine's in-place slot cache with ``decode_attention_op``) or
    "concat" (the functional cache every backend runs)."""
    return _resolve("kv_cache", choice, KV_CACHE_CHOICES, "slots", "concat", decode_attention_op,
                    device_target, compute_dtype)


def resolve_vision_kernels(choice: str, device_target: str, compute_dtype: str = "float32") -> str:
    """The config value -> "fused" (``gelu_op``, ``layer_norm_op`` and ``vision_attention_op`` in the
    vision tower and adapter) or "ops" (MindSpore's ops, every backend)."""
    return _resolve("vision_kernels", choice, VISION_KERNELS_CHOICES, "fused", "ops", build_library,
                    device_target, compute_dtype)


def resolve_decoder_kernels(choice: str, device_target: str, compute_dtype: str = "float32") -> str:
    """The config value -> "fused" (``rms_norm_op`` and ``silu_mul_op`` in the decoder, and
    ``prefill_attention_op`` in the causal-LM step graphs) or "ops" (MindSpore's ops, every backend)."""
    return _resolve("decoder_kernels", choice, DECODER_KERNELS_CHOICES, "fused", "ops", build_library,
                    device_target, compute_dtype)


def resolve_gemm(choice: str, device_target: str, compute_dtype: str = "float32") -> str:
    """The config value -> "amx" (``amx_matmul_op`` in the vision tower, the adapter and the prefill step)
    or "onednn" (ops.MatMul). "auto" picks amx on a float32 CPU model whose CPU and kernel allow AMX:
    quietly onednn on a CPU without AMX-BF16, with a warning if the library does not build or Linux does
    not grant the tile state."""
    if choice == "auto" and "amx_bf16" not in _cpu_flags().split():
        return "onednn"
    return _resolve("gemm", choice, GEMM_CHOICES, "amx", "onednn", _build_amx, device_target, compute_dtype)


def resolve_kernel_threads(choice: str, device_target: str, compute_dtype: str = "float32") -> str:
    """The config value -> "pinned" (MindSpore's CPU kernel threads one to a CPU, ``set_kernel_threads``) or
    "free" (left to the scheduler, as MindSpore leaves them)."""
    return _resolve("kernel_threads", choice, KERNEL_THREADS_CHOICES, "pinned", "free", build_library,
                    device_target, compute_dtype)


def set_kernel_threads(pinned: bool) -> None:
    """Pin MindSpore's CPU kernel threads (ActorThread_*, KernelThread_*, the pool the kernels run on) one to
    a CPU of the process at the next kernel call, or give them back every CPU (``kernel_threads.cc``);
    process-wide. Left to the scheduler, the bench tower's two threads shared one CPU in 30-48% of its
    encodes (1.25-1.6x slower); pinned, 2-3%. Only a pool with as many threads as the process has CPUs is
    pinned (with more, two would share one; with fewer, every worker process would pin to the same CPUs)."""
    ctypes.CDLL(build_library()).SetKernelThreadsPinned(int(bool(pinned)))


def pinned_kernel_threads() -> int:
    """How many of MindSpore's kernel threads the last change pinned (0: none, or unpinned)."""
    return int(ctypes.CDLL(build_library()).PinnedKernelThreads())


def _build_amx():
    """The library, and the tile registers for this process: a CogVLM2ConfigError if they are not granted."""
    build_library()
    if not amx_available():
        raise CogVLM2ConfigError("gemm 'amx' needs a CPU with AMX-BF16 whose tile state Linux grants "
                                 "(arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+); this one does not: "
                                 "set gemm: onednn or auto")


def _resolve(key, choice, choices, kernel, portable, build, device_target, compute_dtype) -> str:
    """``kernel`` is float32 CPU only; "auto" picks it there and falls back to ``portable`` (with a warning
    naming why) only if the library cannot be built."""
    if choice not in choices:
        raise CogVLM2ConfigError(f"{key} {choice!r} must be one of {list(choices)}")
    if choice == portable:
        return portable
    supported = device_target == "CPU" and compute_dtype == "float32"
    if choice == kernel:
        if not supported:
            raise CogVLM2ConfigError(f"{key} {kernel!r} is a float32 CPU kernel; device {device_target} with "
                                     f"compute_dtype {compute_dtype} needs {key}: {portable} or auto")
        build()
        return kernel
    if not supported:
        return portable
    try:
        build()
    except CogVLM2ConfigError as error:
        _logger.warning("%s auto: using %s: %s", key, portable, error)
        return portable
    return kernel
