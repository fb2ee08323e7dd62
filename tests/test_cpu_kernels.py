"""The CPU kernels (cogvlm2_cpu_kernels) against numpy float64, in the dynamic-shape graph mode they run
in: the rows kernel, the AMX product (also with the bias) and its gradient, the decode attention on the
slot cache (written in place, read back by the next step), the vision tower's GELU, LayerNorm and
attention and their gradients, the decoder's prefill attention, RMSNorm and SiLU * up; the slot decode
step against the functional step; build errors and config choices."""
import math
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from scipy.special import erf

from cogvlm2 import cogvlm2_cpu_kernels as kernels_module
from cogvlm2.cogvlm2_cpu_kernels import (amx_available, amx_gated_op, amx_linear_gelu_op, amx_linear_norm_add_op,
                                         amx_linear_op,
                                         amx_matmul_op, decode_attention_op, gelu_op, patchify_op,
                                         layer_norm_op, prefill_attention_op, resolve_decode_matmul, resolve_gemm,
                                         resolve_kv_cache, resolve_decoder_kernels, resolve_kernel_threads,
                                         resolve_vision_kernels, rms_norm_op, rows_matmul_op, set_kernel_threads,
                                         pinned_kernel_threads, silu_mul_op, vision_attention_op)
from cogvlm2.cogvlm2_layers import RMSNorm, attention, grouped_bias
from cogvlm2.cogvlm2_token_types import causal_bias
from cogvlm2.cogvlm2_errors import CogVLM2ConfigError, ContextLengthError
from cogvlm2.cogvlm2_kv_cache import SlotKVCache

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


class Product(nn.Cell):
    """``product(f(x), W)`` in one graph with a dynamic row count; f makes the operand non-contiguous in
    the source (a transpose or a column slice) so the graph hands the kernel a materialised view."""

    def __init__(self, weight, view, product):
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="weight")
        self.view = view
        self.product = product

    def construct(self, x):
        if self.view == "transpose":
            x = x.T                                  # (K, M) -> (M, K)
        elif self.view == "slice":
            x = x[:, 1:-1]                           # (M, K + 2) -> (M, K)
        return self.product(x, self.weight)


def tolerance(x, w):
    """|float32 result - exact| <= K * eps32 * sum_k |x_mk w_kn| (+ the rounding of the output): the
    standard bound for a length-K float32 dot product, whatever order the terms are added in. The rows
    kernel adds in k order, so its error stays well inside this; a wrong element or row is far outside."""
    k = x.shape[1]
    return k * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)) + 1e-30


def check_product(product, k, n, view, rows, seed):
    """``product`` in a dynamic-row graph on operands from ``view``, for each row count: within the
    float32 dot-product bound of float64."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n), dtype=np.float32)
    cell = Product(w, view, product)
    shape = {"contiguous": [None, k], "transpose": [k, None], "slice": [None, k + 2]}[view]
    cell.set_inputs(Tensor(shape=shape, dtype=ms.float32))
    for m in rows:
        x = rng.standard_normal((m, k), dtype=np.float32)
        given = {"contiguous": x, "transpose": np.ascontiguousarray(x.T),
                 "slice": np.pad(x, ((0, 0), (1, 1)), constant_values=np.nan)}[view]
        got = cell(Tensor(given)).asnumpy()
        exact = x.astype(np.float64) @ w.astype(np.float64)
        assert got.shape == (m, n)
        assert np.all(np.abs(got - exact) <= tolerance(x, w)), (m, np.abs(got - exact).max())


@pytest.mark.parametrize("k, n", [(64, 48), (37, 203), (1024, 1536), (300, 16 * 3 + 5), (4100, 70)])
@pytest.mark.parametrize("view", ["contiguous", "transpose", "slice"])
def test_rows_kernel_matches_float64(k, n, view):
    # register blocks 1..16 and the passes beyond 16 rows; 1024 x 1536 and 4100 x 70 are cut along K
    # (4100: halves of 2048 and 2052 rows, not whole groups; 70: scalar columns)
    check_product(rows_matmul_op(), k, n, view, (1, 2, 3, 5, 8, 13, 16, 17, 33), seed=k * n)


needs_amx = pytest.mark.skipif(not amx_available(), reason="this CPU (or kernel) gives no AMX-BF16 tiles")


@needs_amx
@pytest.mark.parametrize("k, n", [(64, 48), (37, 203), (256, 768), (1024, 129), (2100, 40)])
@pytest.mark.parametrize("view", ["contiguous", "transpose", "slice"])
def test_amx_kernel_matches_float64(k, n, view):
    """Within the float32 dot-product bound, like the rows kernel: K not a multiple of 32 and beyond one
    1024-value chunk (2100), N not a multiple of 16, rows below 16 (the rows kernel), 16-31 and tails of
    32-row blocks, operands handed over from a transpose or a slice; 300 rows: tall products whose w
    parts fit in L2 go through their rows (all these shapes but 256 x 768)."""
    check_product(amx_matmul_op(), k, n, view, (1, 15, 16, 31, 33, 100, 300), seed=k * n + 7)


@needs_amx
def test_amx_kernel_keeps_float32_accuracy_where_fewer_bfloat16_parts_would_not():
    """The three-part split is what makes the tile unit exact enough. With 4-term sums, so that the
    float32 bound is tight, the kernel is within it; the same products from one bfloat16 part per value
    miss it ~8000-fold, and from two parts (hi, mid: dropping the lo parts) ~10-fold (numpy, below)."""
    rng = np.random.default_rng(5)
    x = (1 + rng.random((40, 4))).astype(np.float32)
    w = (1 - rng.random((4, 24)) / 2).astype(np.float32)
    got = Apply(amx_matmul_op())(Tensor(x), Tensor(w)).asnumpy()
    exact = x.astype(np.float64) @ w.astype(np.float64)
    bound = tolerance(x, w)
    assert np.all(np.abs(got - exact) <= bound), np.abs(got - exact).max()

    def parts(a, count):
        """The first `count` bfloat16 parts of a (round to nearest even), as float64."""
        out, rest = [], a
        for _ in range(count):
            bits = rest.view(np.uint32)
            part = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)
            out.append(part.astype(np.float64))
            rest = (rest - part).astype(np.float32)
        return out

    for count, factor in ((1, 1000), (2, 5)):
        px, pw = parts(x, count), parts(w, count)
        fewer = sum(px[i] @ pw[j] for i in range(count) for j in range(count) if i + j <= 2)
        assert (np.abs(fewer - exact) / bound).max() > factor


class BiasedProduct(nn.Cell):
    """``linear(x, W, b)`` and ``bias_add(product(x, W), b)`` in one graph with a dynamic row count."""

    def __init__(self, weight, bias, linear, product):
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="weight")
        self.bias = Parameter(Tensor(bias), name="bias")
        self.linear = linear
        self.product = product

    def construct(self, x):
        return self.linear(x, self.weight, self.bias), ops.bias_add(self.product(x, self.weight), self.bias)


@needs_amx
@pytest.mark.parametrize("k, n", [(37, 203), (256, 768), (2100, 40)])
def test_amx_linear_is_the_product_then_the_bias(k, n):
    """The bias added as the sums are stored gives the same bits as the product followed by MindSpore's
    BiasAdd (the bias is added last in both): one and three chunks of K, N not a multiple of 32 (the
    bias of a partial block), rows below 16 (the rows kernel, then the bias), tails of 32-row blocks and
    300 rows (through the rows, but for 256 x 768)."""
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32) * 3
    cell = BiasedProduct(w, b, amx_linear_op(), amx_matmul_op())
    cell.set_inputs(Tensor(shape=[None, k], dtype=ms.float32))
    for m in (1, 15, 16, 31, 33, 100, 300):
        x = rng.standard_normal((m, k), dtype=np.float32)
        fused, separate = (t.asnumpy() for t in cell(Tensor(x)))
        assert fused.shape == (m, n)
        assert np.array_equal(fused, separate), (m, np.abs(fused - separate).max())
        exact = x.astype(np.float64) @ w.astype(np.float64) + b
        assert np.all(np.abs(fused - exact) <= tolerance(x, w) + np.finfo(np.float32).eps * np.abs(exact))


class EpilogueApart(nn.Cell):
    """A fused Linear kernel and the kernels it replaces in turn, in one graph with a dynamic row count:
    ``amx_linear_gelu_op`` against ``gelu_op(amx_linear_op)``, or ``amx_linear_norm_add_op`` against
    ``residual + layer_norm_op(amx_linear_op)``."""

    def __init__(self, weight, bias, norm=None):
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="weight")
        self.bias = Parameter(Tensor(bias), name="bias")
        self.linear = amx_linear_op()
        if norm is None:
            self.fused, self.apart = amx_linear_gelu_op(), gelu_op()
        else:
            self.fused, self.apart = amx_linear_norm_add_op(), layer_norm_op()
            self.norm_weight = Parameter(Tensor(norm[0]), name="norm_weight")
            self.norm_bias = Parameter(Tensor(norm[1]), name="norm_bias")
            self.eps = Tensor(np.array([1e-6], np.float32))
        self.norm = norm is not None

    def construct(self, x, residual):
        z = self.linear(x, self.weight, self.bias)
        if not self.norm:
            return self.fused(x, self.weight, self.bias), self.apart(z)
        return (self.fused(x, self.weight, self.bias, self.norm_weight, self.norm_bias, self.eps, residual),
                residual + self.apart(z, self.norm_weight, self.norm_bias, self.eps))


@needs_amx
@pytest.mark.parametrize("epilogue", ["gelu", "norm_add"])
@pytest.mark.parametrize("k, n", [(37, 203), (256, 200), (2100, 40), (256, 1024)])
def test_amx_fused_epilogues_are_the_kernels_in_turn(epilogue, k, n):
    """AmxLinearGelu and AmxLinearNormAdd give the bits of the Linear, then the GELU / LayerNorm kernel
    (and MindSpore's Add): the rows kernel below 16 rows (then the epilogue on every row), through the
    columns (a block's GELU deferred under the next block's products; the LayerNorm after all panels),
    through the rows (300 x 256 x 200 and x 2100 x 40: a block's GELU, or the row block's LayerNorm,
    deferred under the next row block's products; 270 rows: 9 row blocks, the middle one shared by the
    two threads, its LayerNorm after both), one and three chunks of K, partial blocks. And within float32
    of float64."""
    rng = np.random.default_rng(k + n)
    w = (rng.standard_normal((k, n)) * k ** -0.5).astype(np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    norm = None if epilogue == "gelu" else (rng.standard_normal(n, dtype=np.float32),
                                            rng.standard_normal(n, dtype=np.float32))
    cell = EpilogueApart(w, b, norm)
    cell.set_inputs(Tensor(shape=[None, k], dtype=ms.float32), Tensor(shape=[None, n], dtype=ms.float32))
    for m in (1, 15, 16, 33, 100, 270, 300):
        x = rng.standard_normal((m, k), dtype=np.float32)
        residual = rng.standard_normal((m, n), dtype=np.float32)
        fused, apart = (t.asnumpy() for t in cell(Tensor(x), Tensor(residual)))
        assert fused.shape == (m, n)
        assert np.array_equal(fused, apart), (m, np.abs(fused - apart).max())
        z = x.astype(np.float64) @ w.astype(np.float64) + b
        if norm is None:
            exact = 0.5 * z * (1 + erf(z / math.sqrt(2)))
            assert np.abs(fused - exact).max() <= 1e-5 * max(1.0, np.abs(exact).max())
        else:
            centred = z - z.mean(-1, keepdims=True)
            exact = residual + centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6) * norm[0] + norm[1]
            assert np.abs(fused - exact).max() <= 1e-4 * max(1.0, np.abs(exact).max())


class GatedApart(nn.Cell):
    """``amx_gated_op`` and the kernels it replaces in turn (two ``amx_matmul_op`` products and
    ``silu_mul_op``), in one graph with a dynamic row count."""

    def __init__(self, w_gate, w_up):
        super().__init__()
        self.w_gate = Parameter(Tensor(w_gate), name="w_gate")
        self.w_up = Parameter(Tensor(w_up), name="w_up")
        self.gated, self.product, self.silu_mul = amx_gated_op(), amx_matmul_op(), silu_mul_op()

    def construct(self, x):
        apart = self.silu_mul(self.product(x, self.w_gate), self.product(x, self.w_up))
        return self.gated(x, self.w_gate, self.w_up), apart


@needs_amx
@pytest.mark.parametrize("k, n", [(37, 203), (1024, 130), (2100, 64)])
def test_amx_gated_is_the_products_and_silu_mul_in_turn(k, n):
    """AmxGated gives the bits of the gate and up products and SiluMul: the rows kernel below 16 rows,
    through the columns in panels of 64 (130 columns: two panels and a partial block; 203: four), one and
    three chunks of K, partial row blocks, a block's silu(gate) * up deferred under the next blocks'
    products. And within float32 of float64 (the products' dot-product bound carried through silu and the
    multiplication, plus SiluMul's few ulp)."""
    rng = np.random.default_rng(k + n)
    w_gate, w_up = ((rng.standard_normal((k, n)) * k ** -0.5).astype(np.float32) for _ in range(2))
    cell = GatedApart(w_gate, w_up)
    cell.set_inputs(Tensor(shape=[None, k], dtype=ms.float32))
    for m in (1, 15, 16, 33, 100, 300):
        x = rng.standard_normal((m, k), dtype=np.float32)
        fused, apart = (t.asnumpy() for t in cell(Tensor(x)))
        assert fused.shape == (m, n)
        assert np.array_equal(fused, apart), (m, np.abs(fused - apart).max())
        g, u = (x.astype(np.float64) @ w.astype(np.float64) for w in (w_gate, w_up))
        exact = g / (1 + np.exp(-g)) * u
        # d(silu(g) u) = u silu'(g) dg + silu(g) du, |silu'| <= 1.1
        bound = 1.1 * np.abs(u) * tolerance(x, w_gate) + np.abs(g) * tolerance(x, w_up)
        assert np.all(np.abs(fused - exact) <= bound + 8 * np.finfo(np.float32).eps * np.abs(exact) + 1e-30), \
            np.abs(fused - exact).max()


def check_fused_against_portable(build, fused_kernels, wrap, shape, seed):
    """``build(kernels)`` with ``VisionKernels()`` and with ``fused_kernels``, the same random weights (norm
    weights around 1), gives the same output on a random x of ``shape`` within 1e-5 of its largest value,
    as built and with ``wrap(cell)`` wrapping some of its Linears in LoRA layers."""
    from cogvlm2.cogvlm2_vision import VisionKernels
    rng = np.random.default_rng(seed)
    x = Tensor(rng.standard_normal(shape).astype(np.float32))
    for lora in (False, True):
        cells = [build(kernels) for kernels in (VisionKernels(), fused_kernels)]
        values = {}
        for cell in cells:
            if lora:
                wrap(cell)
            for name, param in cell.parameters_and_names():
                if name not in values:
                    values[name] = (rng.standard_normal(param.shape) * 0.05 + ("weight" in name and "norm" in name)
                                    ).astype(np.float32)
                param.set_data(Tensor(values[name]))
        portable, fused = (cell(x).asnumpy() for cell in cells)
        assert np.abs(fused - portable).max() <= 1e-5 * np.abs(portable).max(), (lora, np.abs(fused - portable).max())


@needs_amx
def test_fused_adapter_leaves_lora_layers_their_own_forward():
    """The adapter's GLU with the gated kernel gives the portable GLU's output, also with gate_proj wrapped
    in a LoRA layer (the gated kernel is then skipped: both products keep their own forward)."""
    from cogvlm2 import CogVLM2Config
    from cogvlm2.cogvlm2_lora import LoRALinear
    from cogvlm2.cogvlm2_vision import GLU, VisionKernels
    config = CogVLM2Config.from_hf_config(os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                                       "bench_config.json"))
    fused_kernels = VisionKernels(gelu=gelu_op(), layer_norm=layer_norm_op(), matmul=amx_matmul_op(),
                                  silu_mul=silu_mul_op(), gated=amx_gated_op())
    def wrap(glu):
        glu.gate_proj = LoRALinear(glu.gate_proj, 4, 8, 0.0)

    check_fused_against_portable(lambda kernels: GLU(config, config.vision_config.hidden_size, ms.float32, kernels),
                                 fused_kernels, wrap, (2, 33, config.vision_config.hidden_size), seed=8)


@needs_amx
def test_fused_tower_layer_leaves_lora_layers_their_own_forward():
    """A tower layer with the fused epilogues (fc1 + GELU, dense / fc2 + LayerNorm + add) gives the
    portable layer's output, also with fc1 and dense wrapped in LoRA layers (which the fused kernels
    would skip: those Linears keep their own forward)."""
    from cogvlm2 import CogVLM2Config
    from cogvlm2.cogvlm2_lora import LoRALinear
    from cogvlm2.cogvlm2_vision import TransformerLayer, VisionKernels
    config = CogVLM2Config.from_hf_config(os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                                       "bench_config.json")).vision_config
    fused_kernels = VisionKernels(gelu=gelu_op(), layer_norm=layer_norm_op(), matmul=amx_matmul_op(),
                                  linear=amx_linear_op(), linear_gelu=amx_linear_gelu_op(),
                                  linear_norm_add=amx_linear_norm_add_op())
    def wrap(layer):
        layer.mlp.fc1 = LoRALinear(layer.mlp.fc1, 4, 8, 0.0)
        layer.attention.dense = LoRALinear(layer.attention.dense, 4, 8, 0.0)

    check_fused_against_portable(lambda kernels: TransformerLayer(config, ms.float32, kernels), fused_kernels, wrap,
                                 (2, 37, config.hidden_size), seed=7)


@needs_amx
def test_amx_fused_epilogue_gradients_match_mindspore_ops():
    """The gradients of AmxLinearGelu, AmxLinearNormAdd and AmxGated in every input (but eps) against the
    same functions in MindSpore's ops."""
    rng = np.random.default_rng(5)
    x, w, b, nw, nb, r, weights = (Tensor(rng.standard_normal(shape).astype(np.float32)) for shape in
                                   [(37, 50), (50, 21), (21,), (21,), (21,), (37, 21), (37, 21)])
    eps = Tensor(np.array([1e-6], np.float32))

    class Loss(nn.Cell):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def construct(self, *args):
            return (self.fn(*args[:-1]) * args[-1]).sum()

    def gelu_portable(x, w, b):
        return ops.gelu(ops.bias_add(ops.matmul(x, w), b), approximate="none")

    def norm_add_portable(x, w, b, nw, nb, eps, r):
        z = ops.bias_add(ops.matmul(x, w), b)
        return r + ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-6)(z, nw, nb)[0]

    def gated_portable(x, w_gate, w_up):
        return ops.silu(ops.matmul(x, w_gate)) * ops.matmul(x, w_up)

    cases = [(amx_linear_gelu_op(), gelu_portable, (x, w, b), (0, 1, 2)),
             (amx_linear_norm_add_op(), norm_add_portable, (x, w, b, nw, nb, eps, r), (0, 1, 2, 3, 4, 6)),
             (amx_gated_op(), gated_portable, (x, w, w * 0.5 + 0.1), (0, 1, 2))]
    for fused, portable, args, positions in cases:
        ours = ms.grad(Loss(fused), grad_position=positions)(*args, weights)
        theirs = ms.grad(Loss(portable), grad_position=positions)(*args, weights)
        assert len(ours) == len(positions)
        for a, c in zip(ours, theirs):
            a, c = a.asnumpy(), c.asnumpy()
            assert np.abs(a - c).max() <= 1e-5 * np.abs(c).max(), np.abs(a - c).max()


class ConvBothWays(nn.Cell):
    """A stride-k convolution as MindSpore's Conv2D and as one AMX product of its patches, in one graph
    with a dynamic frame count: the patch embedding's (``patchify_op``, channels first) or the adapter's
    (channels last, the patches by a reshape and transpose); -> both as (T, positions, out)."""

    def __init__(self, conv, channels_last):
        super().__init__()
        self.conv = conv
        self.channels_last = channels_last
        self.patchify = patchify_op()
        self.size = Tensor(np.zeros(conv.stride, np.float32))

    def construct(self, x):
        t, c, h, w = x.shape
        k = self.conv.stride
        reference = self.conv(x)                                                      # (T, out, h/k, w/k)
        reference = reference.reshape(t, reference.shape[1], -1).swapaxes(1, 2)
        if self.channels_last:
            rows = x.transpose(0, 2, 3, 1).reshape(t, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5)
            product = self.conv.on_patches(rows.reshape(-1, k * k * c), channels_last=True)
        else:
            product = self.conv.on_patches(self.patchify(x, self.size))
        return reference, product.reshape(t, (h // k) * (w // k), -1)


@needs_amx
@pytest.mark.parametrize("channels, out, size, k, channels_last", [(3, 40, 28, 14, False), (3, 256, 224, 14, False),
                                                                   (16, 24, 8, 2, True), (5, 7, 12, 3, False)])
def test_convolution_as_a_product_of_its_patches(channels, out, size, k, channels_last):
    """Conv2d.on_patches on the patch kernel's rows (the tower's patch embedding) or on channels-last
    patches (the adapter's 2 x 2 convolution) against MindSpore's Conv2D: within the float32 bound of a
    C*k*k-term dot product. And the patch kernel's rows are exactly numpy's rearrangement."""
    from cogvlm2.cogvlm2_vision import Conv2d
    rng = np.random.default_rng(channels * out + size)
    conv = Conv2d(channels, out, k, ms.float32, amx_linear_op())
    conv.weight.set_data(Tensor(rng.standard_normal((out, channels, k, k), dtype=np.float32)))
    conv.bias.set_data(Tensor(rng.standard_normal(out, dtype=np.float32)))
    cell = ConvBothWays(conv, channels_last)
    cell.set_inputs(Tensor(shape=[None, channels, size, size], dtype=ms.float32))
    for frames in (1, 3):
        x = rng.standard_normal((frames, channels, size, size), dtype=np.float32)
        reference, product = (t.asnumpy() for t in cell(Tensor(x)))
        g = size // k
        if channels_last:
            patches = x.transpose(0, 2, 3, 1).reshape(frames, g, k, g, k, channels).transpose(0, 1, 3, 2, 4, 5)
            weight = conv.weight.asnumpy().transpose(2, 3, 1, 0).reshape(-1, out)
        else:
            patches = x.reshape(frames, channels, g, k, g, k).transpose(0, 2, 4, 1, 3, 5)
            weight = conv.weight.asnumpy().reshape(out, -1).T
        patches = patches.reshape(frames * g * g, -1)
        exact = patches.astype(np.float64) @ weight.astype(np.float64) + conv.bias.asnumpy()
        exact = exact.reshape(frames, g * g, out)
        bound = tolerance(patches, weight).reshape(frames, g * g, out) + np.finfo(np.float32).eps * np.abs(exact)
        assert np.all(np.abs(product - exact) <= bound), np.abs(product - exact).max()
        assert np.all(np.abs(reference - exact) <= 2 * bound)                       # the same function
    if not channels_last:
        got = patchify_op()(Tensor(x), Tensor(np.zeros(k, np.float32))).asnumpy()
        assert np.array_equal(got, patches)


def test_patchify_gradient_puts_each_value_back():
    rng = np.random.default_rng(6)
    x = Tensor(rng.standard_normal((2, 3, 6, 9)).astype(np.float32))
    size = Tensor(np.zeros(3, np.float32))
    weights = rng.standard_normal((2 * 2 * 3, 3 * 3 * 3)).astype(np.float32)

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.patchify = patchify_op()

        def construct(self, x, size, weights):
            return (self.patchify(x, size) * weights).sum()

    got = ms.grad(Loss())(x, size, Tensor(weights)).asnumpy()
    expected = weights.reshape(2, 2, 3, 3, 3, 3).transpose(0, 3, 1, 4, 2, 5).reshape(2, 3, 6, 9)
    assert np.array_equal(got, expected)


@needs_amx
def test_amx_linear_gradient_matches_mindspore_ops():
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((37, 50)).astype(np.float32))
    w = Tensor(rng.standard_normal((50, 21)).astype(np.float32))
    b = Tensor(rng.standard_normal(21).astype(np.float32))
    r = Tensor(rng.standard_normal((37, 21)).astype(np.float32))

    class Loss(nn.Cell):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def construct(self, x, w, b, weights):
            return (self.linear(x, w, b) * weights).sum()

    def portable(x, w, b):
        return ops.bias_add(ops.matmul(x, w), b)

    ours = ms.grad(Loss(amx_linear_op()), grad_position=(0, 1, 2))(x, w, b, r)
    theirs = ms.grad(Loss(portable), grad_position=(0, 1, 2))(x, w, b, r)
    for a, c in zip(ours, theirs):
        a, c = a.asnumpy(), c.asnumpy()
        assert np.abs(a - c).max() <= 1e-6 * np.abs(c).max(), np.abs(a - c).max()


@needs_amx
def test_amx_gradient_matches_mindspore_matmul():
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((37, 50)).astype(np.float32))
    w = Tensor(rng.standard_normal((50, 21)).astype(np.float32))
    r = Tensor(rng.standard_normal((37, 21)).astype(np.float32))

    class Loss(nn.Cell):
        def __init__(self, product):
            super().__init__()
            self.product = product

        def construct(self, x, w, weights):
            return (self.product(x, w) * weights).sum()

    ours = ms.grad(Loss(amx_matmul_op()), grad_position=(0, 1))(x, w, r)
    theirs = ms.grad(Loss(ops.MatMul()), grad_position=(0, 1))(x, w, r)
    for a, b in zip(ours, theirs):
        a, b = a.asnumpy(), b.asnumpy()
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max(), np.abs(a - b).max()


def test_gemm_choice_is_checked_and_follows_the_cpu(monkeypatch):
    with pytest.raises(CogVLM2ConfigError, match="gemm 'fast' must be one of"):
        resolve_gemm("fast", "CPU")
    with pytest.raises(CogVLM2ConfigError, match="gemm 'amx' is a float32 CPU kernel"):
        resolve_gemm("amx", "Ascend", "bfloat16")
    assert resolve_gemm("auto", "Ascend", "bfloat16") == "onednn"
    assert resolve_gemm("onednn", "CPU") == "onednn"
    assert resolve_gemm("auto", "CPU") == ("amx" if amx_available() else "onednn")
    # a CPU without AMX-BF16: auto quietly keeps oneDNN, amx is refused with what to set
    monkeypatch.setattr(kernels_module, "amx_available", lambda: False)
    assert resolve_gemm("auto", "CPU") == "onednn"
    with pytest.raises(CogVLM2ConfigError, match="gemm 'amx' needs a CPU with AMX-BF16.*set gemm: onednn"):
        resolve_gemm("amx", "CPU")


@pytest.mark.parametrize("resolve, key, kernel, portable", [(resolve_decode_matmul, "decode_matmul", "rows", "onednn"),
                                                           (resolve_kv_cache, "kv_cache", "slots", "concat"),
                                                           (resolve_vision_kernels, "vision_kernels", "fused", "ops"),
                                                           (resolve_decoder_kernels, "decoder_kernels", "fused",
                                                            "ops"),
                                                           (resolve_kernel_threads, "kernel_threads", "pinned",
                                                            "free")])
def test_unknown_choice_and_device_are_one_clear_error(resolve, key, kernel, portable):
    with pytest.raises(CogVLM2ConfigError, match=f"{key} 'fast' must be one of"):
        resolve("fast", "CPU")
    with pytest.raises(CogVLM2ConfigError, match=f"{key} '{kernel}' is a float32 CPU kernel"):
        resolve(kernel, "Ascend", "bfloat16")
    assert resolve("auto", "Ascend", "bfloat16") == portable
    assert resolve(portable, "CPU") == portable
    assert resolve("auto", "CPU") == kernel


def kernel_thread_cpus():
    """{name: allowed CPUs} of this process's threads named ActorThread_* / KernelThread_* (MindSpore's CPU
    kernel pool)."""
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            if name.startswith(("ActorThread_", "KernelThread_")):
                found[name] = os.sched_getaffinity(int(tid))
        except OSError:                      # the thread ended
            pass
    return found


def test_kernel_threads_pinned_one_to_a_cpu_and_freed_again():
    """set_kernel_threads(True): at the next kernel call MindSpore's kernel threads each get one CPU of the
    process, all different (when they are as many as its CPUs, else none is pinned);
    set_kernel_threads(False): every CPU of the process again."""
    cell = Apply(gelu_op())
    x = Tensor(np.linspace(-3, 3, 1 << 17).astype(np.float32))            # 4 threads' worth of values
    cell(x)                                                               # MindSpore's pool exists now
    allowed = os.sched_getaffinity(0)
    try:
        set_kernel_threads(True)
        cell(x)
        pinned = kernel_thread_cpus()
        assert pinned, "no ActorThread_* / KernelThread_* threads: MindSpore's pool is named differently"
        if len(pinned) == len(allowed):
            assert pinned_kernel_threads() == len(pinned)
            assert all(len(cpus) == 1 and cpus <= allowed for cpus in pinned.values()), pinned
            assert len(set.union(*pinned.values())) == len(pinned), pinned       # all different
        else:
            assert pinned_kernel_threads() == 0 and all(cpus == allowed for cpus in pinned.values())
    finally:
        set_kernel_threads(False)
        cell(x)
    assert pinned_kernel_threads() == 0
    assert all(cpus == allowed for cpus in kernel_thread_cpus().values())
    assert os.sched_getaffinity(0) == allowed                             # the calling thread untouched


def test_build_failure_is_one_config_error_line(tmp_path, monkeypatch):
    broken = tmp_path / "rows_matmul.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels_module, "SOURCES", (str(broken),))
    monkeypatch.setenv("COGVLM2_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CogVLM2ConfigError) as info:
        kernels_module.build_library()
    message = str(info.value)
    assert "\n" not in message and "rows_matmul.cc" in message
    assert ("decode_matmul: onednn, kv_cache: concat, vision_kernels: ops, decoder_kernels: ops, gemm: onednn, "
            "kernel_threads: free and param_init_type: float32") in message
    assert not any(name.endswith(".so") or ".tmp" in name for name in os.listdir(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(CogVLM2ConfigError, match="'no-such-compiler-xyz' is not on PATH"):
        kernels_module.build_library()


def test_build_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVLM2_CACHE", str(tmp_path))
    first = kernels_module.build_library()
    assert os.path.isfile(first) and os.path.dirname(first) == str(tmp_path / "kernels")
    mtime = os.path.getmtime(first)
    assert kernels_module.build_library() == first and os.path.getmtime(first) == mtime


class Apply(nn.Cell):
    """``f(*inputs)`` as one graph; ``f`` is a kernel primitive or a function of MindSpore ops."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def construct(self, *inputs):
        return self.f(*inputs)


def exact_gelu(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def test_gelu_kernel_matches_float64():
    """|GELU kernel - float64 GELU| <= ulp(result) (rounding to float32) + 2e-9 |x| (the erf fit's 1.5e-9,
    tools/fit_erf.py) + 4.4e-8 (below x = -4 sqrt 2 the kernel returns 0; |GELU| < 4.4e-8 there), over
    every float32 step of [-12, 12] at 1e-5, in 1-D and 3-D, every tail length of the 8-wide vectors."""
    cell = Apply(gelu_op())
    cell.set_inputs(Tensor(shape=[None], dtype=ms.float32))
    x = np.linspace(-12, 12, 2400001).astype(np.float32)
    got = cell(Tensor(x)).asnumpy()
    exact = exact_gelu(x)
    bound = np.spacing(np.abs(exact).astype(np.float32)) + 2e-9 * np.abs(x) + 4.4e-8
    assert np.all(np.abs(got - exact) <= bound), np.abs(got - exact).max()
    assert np.abs(got - exact).max() <= 2.5e-7           # MindSpore's own ops.gelu: 4.5e-7 on this grid
    special = cell(Tensor(np.array([np.inf, -np.inf, np.nan, 0.0, 1e30, -1e30], np.float32))).asnumpy()
    assert special[0] == np.inf and special[1] == 0 and np.isnan(special[2]) and special[3] == 0
    assert special[4] == np.float32(1e30) and special[5] == 0
    rng = np.random.default_rng(0)
    for n in range(1, 18):
        x = rng.standard_normal(n).astype(np.float32) * 3
        assert np.abs(cell(Tensor(x)).asnumpy() - exact_gelu(x)).max() <= 2.5e-7, n
    cube = Apply(gelu_op())
    cube.set_inputs(Tensor(shape=[None, None, None], dtype=ms.float32))
    x = rng.standard_normal((3, 257, 1024)).astype(np.float32) * 3
    assert np.abs(cube(Tensor(x)).asnumpy() - exact_gelu(x)).max() <= 2.5e-7


def exact_layer_norm(x, weight, bias, eps):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


@pytest.mark.parametrize("size", [1, 7, 8, 33, 256, 1792])
def test_layer_norm_kernel_matches_float64(size):
    """Statistics and normalisation in double, rounded once: within one float32 ulp of the float64
    LayerNorm, for rows of any length (8-wide vectors and their tail), 2-D and 3-D, a constant row."""
    cell = Apply(layer_norm_op())
    cell.set_inputs(Tensor(shape=[None, None], dtype=ms.float32), Tensor(shape=[None], dtype=ms.float32),
                    Tensor(shape=[None], dtype=ms.float32), Tensor(shape=[1], dtype=ms.float32))
    rng = np.random.default_rng(size)
    weight = rng.standard_normal(size).astype(np.float32)
    bias = rng.standard_normal(size).astype(np.float32)
    for rows, eps in ((1, 1e-6), (5, 1e-5), (771, 1e-6)):
        x = (rng.standard_normal((rows, size)) * 4 + 3).astype(np.float32)
        x[0] = 2.5                                          # variance 0: the row becomes the bias
        eps32 = np.float32(eps)
        got = cell(Tensor(x), Tensor(weight), Tensor(bias), Tensor(np.array([eps32]))).asnumpy()
        exact = exact_layer_norm(x, weight, bias, np.float64(eps32))
        assert np.all(np.abs(got - exact) <= np.spacing(np.abs(exact).astype(np.float32))), (rows, eps)
    cube = Apply(layer_norm_op())
    x = rng.standard_normal((3, 257, size)).astype(np.float32)
    got = cube(Tensor(x), Tensor(weight), Tensor(bias), Tensor(np.array([1e-6], np.float32))).asnumpy()
    exact = exact_layer_norm(x, weight, bias, np.float64(np.float32(1e-6)))
    assert np.all(np.abs(got - exact) <= np.spacing(np.abs(exact).astype(np.float32)))


class LayerNormLoss(nn.Cell):
    """sum(LayerNorm(x) * r): the kernel's or ops.LayerNorm's, for their gradients."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-5)
        self.eps = Tensor(np.array([1e-5], np.float32))

    def construct(self, x, weight, bias, r):
        if self.kernel is None:
            y = self.layer_norm(x, weight, bias)[0]
        else:
            y = self.kernel(x, weight, bias, self.eps)
        return (y * r).sum()


class GeluLoss(nn.Cell):
    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def construct(self, x, r):
        y = ops.gelu(x, approximate="none") if self.kernel is None else self.kernel(x)
        return (y * r).sum()


def test_gelu_and_layer_norm_gradients_match_mindspore_ops():
    """The kernels' bprop (MindSpore ops) gives MindSpore's own gradients: x, weight and bias."""
    rng = np.random.default_rng(1)
    x = Tensor((rng.standard_normal((2, 9, 40)) * 3).astype(np.float32))
    r = Tensor(rng.standard_normal((2, 9, 40)).astype(np.float32))
    weight = Tensor(rng.standard_normal(40).astype(np.float32))
    bias = Tensor(rng.standard_normal(40).astype(np.float32))
    ours = ms.grad(LayerNormLoss(layer_norm_op()), grad_position=(0, 1, 2))(x, weight, bias, r)
    theirs = ms.grad(LayerNormLoss(None), grad_position=(0, 1, 2))(x, weight, bias, r)
    for a, b in zip(ours, theirs):
        a, b = a.asnumpy(), b.asnumpy()
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), np.abs(a - b).max()
    ours = ms.grad(GeluLoss(gelu_op()))(x, r).asnumpy()
    theirs = ms.grad(GeluLoss(None))(x, r).asnumpy()
    assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(theirs).max()


@pytest.mark.parametrize("size", [1, 7, 8, 33, 1024])
def test_rms_norm_kernel_matches_float64(size):
    """Squares summed and the row scaled in double, rounded once: within one float32 ulp of the float64
    RMSNorm, for rows of any length (8-wide vectors and their tail), a row of zeros (eps alone)."""
    cell = Apply(rms_norm_op())
    cell.set_inputs(Tensor(shape=[None, None], dtype=ms.float32), Tensor(shape=[None], dtype=ms.float32),
                    Tensor(shape=[1], dtype=ms.float32))
    rng = np.random.default_rng(size)
    weight = rng.standard_normal(size).astype(np.float32)
    for rows, eps in ((1, 1e-5), (6, 1e-6), (413, 1e-5)):
        x = (rng.standard_normal((rows, size)) * 3).astype(np.float32)
        x[0] = 0.0
        eps32 = np.float32(eps)
        got = cell(Tensor(x), Tensor(weight), Tensor(np.array([eps32]))).asnumpy()
        x64 = x.astype(np.float64)
        exact = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + np.float64(eps32)) * weight
        assert np.all(np.abs(got - exact) <= np.spacing(np.abs(exact).astype(np.float32))), (rows, eps)


def test_silu_mul_kernel_matches_float64():
    """silu(g) * u within 4 float32 ulp of the float64 value (the exp's 2 ulp, a division and two
    products), over g in [-90, 90] and every tail length of the vectors, 1-D and 3-D; near zero within
    100 x float32's smallest normal (1.2e-36) times (1 + |u|): below g = -87.3 e^-|g| is flushed to the
    smallest normal, and results below it may be flushed to zero."""
    cell = Apply(silu_mul_op())
    cell.set_inputs(Tensor(shape=[None], dtype=ms.float32), Tensor(shape=[None], dtype=ms.float32))
    rng = np.random.default_rng(3)

    def check(g, u, got):
        g64, u64 = g.astype(np.float64), u.astype(np.float64)
        exact = g64 / (1 + np.exp(-g64)) * u64
        floor = 100 * np.finfo(np.float32).tiny * (1 + np.abs(u64))
        bad = np.abs(got - exact) > 4 * np.spacing(np.abs(exact).astype(np.float32)) + floor
        assert not bad.any(), (g[bad][:3], u[bad][:3], got[bad][:3], exact[bad][:3])

    g = np.linspace(-90, 90, 1800001).astype(np.float32)
    u = rng.standard_normal(g.shape).astype(np.float32)
    check(g, u, cell(Tensor(g), Tensor(u)).asnumpy())
    for n in range(1, 34):
        g, u = (rng.standard_normal((2, n)) * 4).astype(np.float32)
        check(g, u, cell(Tensor(g), Tensor(u)).asnumpy())
    cube = Apply(silu_mul_op())
    cube.set_inputs(Tensor(shape=[None, None, None], dtype=ms.float32), Tensor(shape=[None, None, None], dtype=ms.float32))
    g, u = (rng.standard_normal((2, 3, 64, 2816)) * 4).astype(np.float32)
    check(g, u, cube(Tensor(g), Tensor(u)).asnumpy())


class DecoderLoss(nn.Cell):
    """sum(down(RMSNorm(x)) * r) with the SwiGLU between: the kernels' or MindSpore's ops, for gradients."""

    def __init__(self, rms_norm, silu_mul, weight):
        super().__init__()
        self.norm = RMSNorm(weight.shape[0], 1e-5, kernel=rms_norm)
        self.norm.weight.set_data(Tensor(weight))
        self.silu_mul = silu_mul

    def construct(self, x, gate_w, up_w, r):
        h = self.norm(x)
        gate, up = ops.matmul(h, gate_w), ops.matmul(h, up_w)
        y = ops.silu(gate) * up if self.silu_mul is None else self.silu_mul(gate, up)
        return (y * r).sum()


def test_rms_norm_and_silu_mul_gradients_match_mindspore_ops():
    rng = np.random.default_rng(4)
    x, gate_w, up_w, r = (Tensor(a.astype(np.float32)) for a in (
        rng.standard_normal((9, 48)), rng.standard_normal((48, 80)) * 0.2, rng.standard_normal((48, 80)) * 0.2,
        rng.standard_normal((9, 80))))
    weight = (1 + 0.1 * rng.standard_normal(48)).astype(np.float32)
    grads = {}
    for name, kernels in (("kernels", (rms_norm_op(), silu_mul_op())), ("ops", (None, None))):
        loss = DecoderLoss(*kernels, weight)
        grads[name] = ms.grad(loss, grad_position=(0, 1, 2), weights=loss.trainable_params())(x, gate_w, up_w, r)
    (ours_inputs, ours_weights), (theirs_inputs, theirs_weights) = grads["kernels"], grads["ops"]
    for a, b in zip(tuple(ours_inputs) + tuple(ours_weights), tuple(theirs_inputs) + tuple(theirs_weights)):
        a, b = a.asnumpy(), b.asnumpy()
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), np.abs(a - b).max()


def split_heads(qkv, heads):
    """(T, L, 3C) -> q, k, v each (T, heads, L, d), float64."""
    t, length, width = qkv.shape
    parts = np.asarray(qkv, np.float64).reshape(t, length, 3, heads, width // 3 // heads).transpose(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[2]


class VisionAttention(nn.Cell):
    """The kernel, or the portable path (split, heads, cogvlm2_layers.attention, merge), on qkv."""

    def __init__(self, heads, kernel):
        super().__init__()
        self.heads = heads
        self.kernel = kernel
        self.heads_tensor = Tensor(np.array([heads], np.int32))

    def construct(self, qkv):
        if self.kernel is not None:
            return self.kernel(qkv, self.heads_tensor)
        t, length, width = qkv.shape
        d = width // 3 // self.heads
        q, k, v = ops.split(qkv, width // 3, -1)
        q, k, v = (x.reshape(t, length, self.heads, d).swapaxes(1, 2) for x in (q, k, v))
        return attention(q, k, v, None, d ** -0.5).swapaxes(1, 2).reshape(t, length, -1)


@pytest.mark.parametrize("frames, length, heads, d", [(3, 257, 4, 64), (1, 257, 16, 112), (2, 17, 3, 16),
                                                      (1, 5, 2, 20), (1, 33, 5, 7), (2, 1, 1, 8)])
def test_vision_attention_kernel_matches_float64(frames, length, heads, d):
    """Within the float32 error bound of its sums: a score's d-term dot product (d eps sum|q_c k_c|),
    which the softmax turns into a relative error of twice that in p, and the L-term sums of the
    softmax and of p v (L eps each), times the largest |v|. Query rows in blocks of 4 and their tail,
    keys in vectors of 16 and the padding, head sizes that are and are not multiples of 16."""
    rng = np.random.default_rng(length * d + heads)
    qkv = (rng.standard_normal((frames, length, 3 * heads * d)) * 2).astype(np.float32)
    cell = VisionAttention(heads, vision_attention_op(heads))
    cell.set_inputs(Tensor(shape=[None, None, 3 * heads * d], dtype=ms.float32))
    got = cell(Tensor(qkv)).asnumpy()
    q, k, v = split_heads(qkv, heads)
    q = q * np.float32(d ** -0.5)
    scores = q @ k.swapaxes(-1, -2)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    exact = (probs @ v).transpose(0, 2, 1, 3).reshape(frames, length, heads * d)
    eps = np.finfo(np.float32).eps
    score_error = d * eps * (np.abs(q) @ np.abs(k).swapaxes(-1, -2)).max(-1, keepdims=True)   # (T, heads, L, 1)
    bound = (2 * score_error + 2 * length * eps + eps) * np.abs(v).max(-2, keepdims=True)      # (T, heads, L, d)
    bound = bound.transpose(0, 2, 1, 3).reshape(frames, length, heads * d)
    assert got.shape == exact.shape
    assert np.all(np.abs(got - exact) <= bound), np.abs(got - exact).max()


class DecoderAttention(nn.Cell):
    """The prefill kernel on the raw bias, or the portable path on the grouped bias; -> (B, L, Hq * d)."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def construct(self, q, k, v, bias):
        b, hq, length, d = q.shape
        if self.kernel is not None:
            return self.kernel(q, k, v, bias)
        hkv = k.shape[1]
        out = attention(q, k, v, grouped_bias(bias, hkv, hq // hkv), d ** -0.5)
        return out.swapaxes(1, 2).reshape(b, length, hq * d)


def decoder_attention(kernel, q, k, v, bias):
    cell = DecoderAttention(kernel)
    cell.set_inputs(*(Tensor(shape=[None] * 4, dtype=ms.float32) for _ in range(4)))
    return cell(Tensor(q), Tensor(k), Tensor(v), Tensor(bias)).asnumpy()


@pytest.mark.parametrize("batch, hq, hkv, length, past, d, holes", [
    (1, 16, 4, 413, 0, 64, False),    # the bench model's prompt: causal, GQA groups of 4
    (2, 4, 2, 7, 5, 16, False),       # new tokens after a cache
    (2, 8, 2, 1, 30, 64, False),      # one decode token per row
    (3, 4, 4, 9, 0, 24, True),        # padding and holes in the attention mask
    (1, 2, 1, 37, 0, 100, True),      # head size not a multiple of 16
    (2, 3, 1, 70, 3, 7, True)])
def test_prefill_attention_kernel_matches_float64(batch, hq, hkv, length, past, d, holes):
    """Rows that see a key: within the float32 bound of the vision kernel's test (keys a row does not
    see get weight 0 in float64 as in the portable softmax, the kernel leaves those after its block's
    last visible key out). Rows that see none (padding): the portable path's output."""
    rng = np.random.default_rng(length * d + hq)
    total = past + length
    q = (rng.standard_normal((batch, hq, length, d)) * 2).astype(np.float32)
    k = (rng.standard_normal((batch, hkv, total, d)) * 2).astype(np.float32)
    v = rng.standard_normal((batch, hkv, total, d)).astype(np.float32)
    mask = np.ones((batch, total), np.int64)
    if holes:
        mask[0, :past + length // 2] = 0                     # left padding: early rows see nothing
        mask[-1] = rng.integers(0, 2, total)
        mask[-1, -1] = 1
    bias = causal_bias(mask, past)                           # (B, 1, L, S)
    got = decoder_attention(prefill_attention_op(), q, k, v, bias)
    portable = decoder_attention(None, q, k, v, bias)
    group = hq // hkv
    k64, v64 = (np.repeat(np.asarray(x, np.float64), group, 1) for x in (k, v))      # (B, Hq, S, d)
    scaled = (q * np.float32(d ** -0.5)).astype(np.float64)
    scores = scaled @ k64.swapaxes(-1, -2) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    exact = (probs @ v64).transpose(0, 2, 1, 3).reshape(batch, length, hq * d)
    eps = np.finfo(np.float32).eps
    score_error = d * eps * (np.abs(scaled) @ np.abs(k64).swapaxes(-1, -2)).max(-1, keepdims=True)
    bound = (2 * score_error + 2 * total * eps + eps) * np.abs(v64).max(-2, keepdims=True)   # (B, Hq, L, d)
    bound = bound.transpose(0, 2, 1, 3).reshape(batch, length, hq * d)
    sees = (bias[:, 0] == 0).any(-1)                                                  # (B, L)
    assert got.shape == exact.shape == portable.shape
    assert np.all(np.abs(got - exact)[sees] <= bound[sees]), np.abs(got - exact)[sees].max()
    assert np.isfinite(got).all()
    assert np.abs(got - portable)[~sees].max(initial=0) <= 1e-5 * np.abs(v).max()


def test_vision_attention_gradient_matches_the_portable_path():
    rng = np.random.default_rng(2)
    heads, d = 3, 12
    qkv = Tensor((rng.standard_normal((2, 19, 3 * heads * d)) * 2).astype(np.float32))
    r = Tensor(rng.standard_normal((2, 19, heads * d)).astype(np.float32))

    class Loss(nn.Cell):
        def __init__(self, kernel):
            super().__init__()
            self.attend = VisionAttention(heads, kernel)

        def construct(self, x, weights):
            return (self.attend(x) * weights).sum()

    ours = ms.grad(Loss(vision_attention_op(heads)))(qkv, r).asnumpy()
    theirs = ms.grad(Loss(None))(qkv, r).asnumpy()
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max(), np.abs(ours - theirs).max()


TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny_chat")


def test_decode_calls_of_several_rows_use_the_rows_graph_and_match_the_onednn_step():
    from cogvlm2 import CogVLM2ForVideo
    from cogvlm2.cogvlm2_token_types import causal_bias
    assert CogVLM2ForVideo.from_pretrained(TINY, decode_matmul="onednn").decode_step is None
    model = CogVLM2ForVideo.from_pretrained(TINY)            # auto: rows on CPU
    assert model.decode_step is not None
    rng = np.random.default_rng(0)
    batch, length = 3, 6
    ids = rng.integers(0, 1000, (batch, length))
    positions = np.tile(np.arange(length), (batch, 1))
    _, past = model.run_step(ids, None, np.zeros_like(ids), positions, causal_bias(np.ones_like(ids), 0),
                             model.empty_cache(batch), np.arange(batch) * length + length - 1)
    calls = []
    decode_step = model.decode_step
    object.__setattr__(model, "decode_step", lambda *a: calls.append(a[0].shape) or decode_step(*a))
    step = (rng.integers(0, 1000, (batch, 1)), None, np.zeros((batch, 1), np.int64), np.full((batch, 1), length),
            causal_bias(np.ones((batch, length + 1), np.int64), length), past, np.arange(batch))
    rows_logits = model.run_step(*step)[0].asnumpy()
    assert calls == [(batch, 1)]
    model.run_step(*[a[:1] if isinstance(a, np.ndarray) else a for a in step[:5]],
                   tuple(p[:1] for p in past), np.arange(1))
    assert calls == [(batch, 1)]                             # one row stays on the oneDNN step graph
    object.__setattr__(model, "decode_step", None)
    onednn_logits = model.run_step(*step)[0].asnumpy()
    np.testing.assert_allclose(rows_logits, onednn_logits, rtol=0, atol=1e-6)


class SlotAttention(nn.Cell):
    def __init__(self):
        super().__init__()
        self.attend = decode_attention_op()

    def construct(self, qkv, cos, sin, scale, k_cache, v_cache, slots, positions):
        return self.attend(qkv, cos, sin, scale, k_cache, v_cache, slots, positions)


def rotated(x, cos, sin):
    """The graph's rotary (``cogvlm2_llm.apply_rotary``) in float32 numpy, one rounding per op: x (..., d),
    cos/sin broadcast to it."""
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def reference_attention(q, k_cache, v_cache, slots, positions):
    """float64: query head h of row b over positions 0..positions[b] of kv head h // group in its slot."""
    b, hq, _ = q.shape
    group = hq // k_cache.shape[1]
    out = np.zeros(q.shape)
    for row in range(b):
        for h in range(hq):
            keys = k_cache[slots[row], h // group, :positions[row] + 1].astype(np.float64)
            values = v_cache[slots[row], h // group, :positions[row] + 1].astype(np.float64)
            scores = keys @ q[row, h].astype(np.float64)
            p = np.exp(scores - scores.max())
            out[row, h] = (p / p.sum()) @ values
    return out


@pytest.mark.parametrize("hq, hkv, d", [(4, 2, 8), (16, 4, 64), (6, 6, 20)])
def test_decode_attention_writes_in_place_and_matches_float64(hq, hkv, d):
    """From the fused q/k/v rows: the rotated keys land in the cache with the bits of the graph's rotary
    (each op rounded), and the output is attention of the rotated, scaled queries."""
    rng = np.random.default_rng(hq * d)
    cell = SlotAttention()
    width = (hq + 2 * hkv) * d
    cell.set_inputs(Tensor(shape=[None, width], dtype=ms.float32), Tensor(shape=[None, d], dtype=ms.float32),
                    Tensor(shape=[None, d], dtype=ms.float32), Tensor(shape=[1], dtype=ms.float32),
                    Tensor(shape=[None, hkv, None, d], dtype=ms.float32),
                    Tensor(shape=[None, hkv, None, d], dtype=ms.float32),
                    Tensor(shape=[None], dtype=ms.int32), Tensor(shape=[None], dtype=ms.int32))
    slots_total, capacity = 5, 700
    k_cache = rng.standard_normal((slots_total, hkv, capacity, d), dtype=np.float32)
    v_cache = rng.standard_normal((slots_total, hkv, capacity, d), dtype=np.float32)
    k_tensor, v_tensor = Tensor.from_numpy(k_cache), Tensor.from_numpy(v_cache)
    scale = np.array([d ** -0.5], np.float32)
    # 1 row at position 0, then rows of mixed lengths (the long ones take the kernel's second thread)
    for slots, positions in (([3], [0]), ([4, 0, 2], [17, 650, 1]), ([1, 2, 0, 3, 4], [5, 2, 651, 300, 18])):
        slots, positions = np.array(slots, np.int32), np.array(positions, np.int32)
        rows = len(slots)
        qkv = rng.standard_normal((rows, width), dtype=np.float32)
        angles = rng.uniform(0, 100, (rows, d // 2)).astype(np.float32)
        cos, sin = np.cos(np.tile(angles, 2)), np.sin(np.tile(angles, 2))          # (rows, d)
        q, k, v = np.split(qkv.reshape(rows, hq + 2 * hkv, d), [hq, hq + hkv], 1)
        k = rotated(k, cos[:, None], sin[:, None])
        q = rotated(q, cos[:, None], sin[:, None]) * scale[0]
        untouched = k_cache.copy()
        got = cell(Tensor(qkv), Tensor(cos), Tensor(sin), Tensor(scale), k_tensor, v_tensor, Tensor(slots),
                   Tensor(positions)).asnumpy()
        assert got.shape == (rows, hq * d)
        for row in range(rows):                 # this step's key and value landed in the engine's arrays
            np.testing.assert_array_equal(k_cache[slots[row], :, positions[row]], k[row])
            np.testing.assert_array_equal(v_cache[slots[row], :, positions[row]], v[row])
            untouched[slots[row], :, positions[row]] = k[row]
        np.testing.assert_array_equal(k_cache, untouched)       # and nothing else moved
        exact = reference_attention(q, k_cache, v_cache, slots, positions)
        # a convex combination of v rows: float32 error ~ (length * eps) * max |v|
        bound = (positions.max() + 1) * np.finfo(np.float32).eps * np.abs(v_cache).max() * 4
        assert np.abs(got.reshape(rows, hq, d) - exact).max() <= bound, np.abs(got.reshape(rows, hq, d) - exact).max()


def test_slot_cache_stores_prefills_and_costs_memory_only_where_written():
    from cogvlm2 import CogVLM2Config
    config = CogVLM2Config(hidden_size=64, num_attention_heads=4, num_multi_query_heads=2, num_hidden_layers=2,
                           max_position_embeddings=600)
    cache = SlotKVCache(config, slots=3)
    assert cache.capacity == 600 and len(cache.tensors) == 4 and cache.tensors[0].shape == (3, 2, 600, 16)
    past = [Tensor(np.arange(2 * 12 * 16, dtype=np.float32).reshape(1, 2, 12, 16) + 1000 * i) for i in range(4)]
    assert cache.store(1, past) == 12
    padded = [np.concatenate([np.full((2, 2, 3, 16), np.nan, np.float32), p.asnumpy().repeat(2, 0)], 2)
              for p in past]                                # a batch of 2 rows, 3 padding columns in front
    assert cache.store(2, padded, row=1, columns=np.arange(3, 15)) == 12
    for i, tensor in enumerate(cache.tensors):              # the tensors see the arrays' contents
        values = tensor.asnumpy()
        for slot in (1, 2):
            np.testing.assert_array_equal(values[slot, :, :12], past[i].asnumpy()[0])
        assert not values[1, :, 12:].any() and not values[0].any()
    cache.check(600)
    with pytest.raises(ContextLengthError, match="601 cached positions; the model's context is 600"):
        cache.check(601)
    big = CogVLM2Config(hidden_size=1024, num_attention_heads=8, num_multi_query_heads=8, num_hidden_layers=4,
                        max_position_embeddings=65536)                 # 16 GiB of arrays
    before = rss_mb()
    huge = SlotKVCache(big, slots=8)
    huge.store(3, [np.ones((1, 8, 100, 128), np.float32)] * 8)
    assert sum(t.shape[0] * t.shape[1] * t.shape[2] * t.shape[3] * 4 for t in huge.tensors) == 16 << 30
    assert rss_mb() - before < 200                          # 16 GiB allocated, ~3 MB written


def rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_slot_decode_step_matches_the_functional_step():
    """Three sequences of different lengths in slots 2, 0, 3 of a cache that grows while they decode:
    each step's logits equal each sequence's own functional-cache step."""
    from mindspore import mutable
    from cogvlm2 import CogVLM2ForVideo
    from cogvlm2.cogvlm2_token_types import causal_bias
    assert CogVLM2ForVideo.from_pretrained(TINY, kv_cache="concat").slot_step is None
    model = CogVLM2ForVideo.from_pretrained(TINY)            # auto: slots on CPU
    rng = np.random.default_rng(0)
    lengths, slots = [7, 12, 3], np.array([2, 0, 3])
    cache = SlotKVCache(model.config, 4)
    pasts = []
    for slot, length in zip(slots, lengths):
        ids = rng.integers(0, 1000, (1, length))
        _, past = model.run_step(ids, None, np.zeros_like(ids), np.arange(length)[None],
                                 causal_bias(np.ones_like(ids), 0), model.empty_cache(1), np.array([length - 1]))
        pasts.append(past)
        cache.store(slot, past)
    cache_positions = np.array(lengths)
    for _ in range(12):
        tokens = rng.integers(0, 1000, (3, 1))
        positions = cache_positions[:, None] + 5             # rotary positions need not be cache positions
        expected = []
        for row in range(3):
            n = pasts[row][0].shape[2]
            logits, pasts[row] = model.run_step(tokens[row:row + 1], None, np.zeros((1, 1), np.int64),
                                                positions[row:row + 1], causal_bias(np.ones((1, n + 1), np.int64), n),
                                                mutable(tuple(pasts[row])), np.array([0]))
            expected.append(logits.asnumpy())
        got = model.run_slot_step(tokens, positions, cache, slots, cache_positions).asnumpy()
        cache_positions = cache_positions + 1
        np.testing.assert_allclose(got, np.concatenate(expected), rtol=0, atol=1e-6)
    # one sequence runs the ops.MatMul slot graph, several the rows-kernel one; the same logits
    calls = []
    graphs = [model.slot_step, model.slot_rows_step]
    for name in ("slot_step", "slot_rows_step"):
        graph = getattr(model, name)
        object.__setattr__(model, name, lambda *a, graph=graph, name=name: calls.append(name) or graph(*a))
    tokens = rng.integers(0, 1000, (3, 1))
    both = model.run_slot_step(tokens, cache_positions[:, None], cache, slots, cache_positions).asnumpy()
    single = [model.run_slot_step(tokens[r:r + 1], cache_positions[r:r + 1, None], cache, slots[r:r + 1],
                                  cache_positions[r:r + 1]).asnumpy() for r in range(3)]
    assert calls == ["slot_rows_step"] + ["slot_step"] * 3
    np.testing.assert_allclose(both, np.concatenate(single), rtol=0, atol=1e-6)
    # static graphs: 3 rows ran padded to 4 (a row on the free slot 1), so one graph per padded size
    assert [len(graph.compile_cache) for graph in graphs] == [1, 1]
