"""EVA2-CLIP-E vision tower and the CogVLM2 adapter (conv 2x2 + GLU + boi/eoi).

Parameter names follow the HF checkpoint under ``model.vision.*``:
``patch_embedding.{proj, cls_embedding, position_embedding}``, ``transformer.layers.N.*``,
``conv``, ``linear_proj.*``, ``boi``, ``eoi``.

``VisionKernels``: the GELU, LayerNorm, attention, SiLU * up and product every cell of the tower and the
adapter uses (None: MindSpore's ops; on CPU ``cogvlm2_cpu_kernels.gelu_op`` / ``layer_norm_op`` /
``vision_attention_op`` / ``silu_mul_op``, chosen by ``vision_kernels``, and ``amx_matmul_op`` /
``amx_linear_op``, chosen by ``gemm``; with both, ``amx_linear_gelu_op`` / ``amx_linear_norm_add_op``
take the step after a tower Linear into its kernel, with the same bits, ``amx_gated_op`` does the
adapter's gate and up products and silu(gate) * up in one, and ``patchify_op`` turns the
patch convolution into one product; the adapter's 2 x 2 convolution is one with ``amx_linear_op`` alone).
"""
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from cogvlm2.cogvlm2_layers import (Embedding, LayerNorm, Linear, placeholder, attention, gelu, swiglu,
                                    to_ms_dtype)

__all__ = ["EVA2CLIPModel", "VisionKernels"]


class VisionKernels(NamedTuple):
    gelu: object = None          # x -> GELU(x)
    layer_norm: object = None    # (x, weight, bias, eps (1,)) -> LayerNorm(x)
    attention: object = None     # (qkv (T, L, 3C), heads (1,) int32) -> (T, L, C)
    matmul: object = None        # (x (N, in), W (in, out)) -> (N, out), every Linear's product
    linear: object = None        # (x, W, b (out,)) -> x W + b, the product and bias of every biased Linear
    silu_mul: object = None      # (gate, up) -> silu(gate) * up, the adapter's SwiGLU
    linear_gelu: object = None   # (x, W, b) -> GELU(x W + b): the MLP's fc1 and GELU
    linear_norm_add: object = None   # (x, W, b, norm weight, norm bias, eps (1,), r) -> r + LN(x W + b)
    patches: object = None       # (images (T, C, H, W), size (p,)) -> (T * H/p * W/p, C * p * p)
    gated: object = None         # (x, W_gate, W_up) -> silu(x W_gate) * (x W_up): the adapter's SwiGLU products


class Conv2d(nn.Cell):
    """Conv2d with PyTorch names and layout: weight (out, in, k, k), bias (out,), stride = k, no padding.
    Its patches never overlap, so with ``linear`` ((x, W, b) -> x W + b, the AMX Linear kernel) it is also
    one product of the patches as rows: ``on_patches``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dtype, linear=None):
        super().__init__()
        self.weight = Parameter(placeholder((out_channels, in_channels, kernel_size, kernel_size), dtype),
                                name="weight")
        self.bias = Parameter(placeholder((out_channels,), dtype), name="bias")
        self.stride = kernel_size
        self.linear = linear

    def construct(self, x):
        return ops.bias_add(ops.conv2d(x, self.weight, stride=self.stride, pad_mode="valid"), self.bias)

    def on_patches(self, patches, channels_last: bool = False):
        """The convolution of patches (N, in*k*k) given as rows, their values in (c, ky, kx) order, or in
        (ky, kx, c) order if ``channels_last``: -> (N, out) through ``linear``, the weight laid out to match."""
        out = self.weight.shape[0]
        if channels_last:
            weight = self.weight.transpose(2, 3, 1, 0).reshape(-1, out)           # (k*k*in, out)
        else:
            weight = self.weight.reshape(out, -1).swapaxes(0, 1)                  # (in*k*k, out)
        return self.linear(patches, weight, self.bias)


class PatchEmbedding(nn.Cell):
    """Frames -> patch tokens with a learned CLS in front and learned positions added."""

    def __init__(self, config, dtype, kernels: VisionKernels):
        super().__init__()
        self.proj = Conv2d(config.in_channels, config.hidden_size, config.patch_size, dtype, kernels.linear)
        self.cls_embedding = Parameter(placeholder((1, config.hidden_size), dtype), name="cls_embedding")
        self.position_embedding = Embedding(config.num_positions, config.hidden_size, dtype)
        self.patchify = kernels.patches if kernels.linear is not None else None
        self.patch_size = Tensor(np.zeros(config.patch_size, np.float32))      # its length is the patch size

    def construct(self, images):
        t = images.shape[0]
        if self.patchify is None:
            x = self.proj(images)                               # (T, C, 16, 16)
            c = x.shape[1]
            x = x.reshape(t, c, -1).swapaxes(1, 2)              # (T, 256, C)
        else:
            x = self.proj.on_patches(self.patchify(images, self.patch_size))   # (T * 256, C)
            c = x.shape[-1]
            x = x.reshape(t, -1, c)                             # (T, 256, C)
        cls = ops.broadcast_to(self.cls_embedding.reshape(1, 1, c), (t, 1, c))
        x = ops.concat((cls, x), 1)                             # (T, 257, C)
        return x + ops.broadcast_to(self.position_embedding.weight.reshape(1, -1, c), x.shape)


class Attention(nn.Cell):
    """Non-causal multi-head attention with a fused, biased qkv projection: ``kernels.attention`` (qkv,
    heads) -> (T, L, C) if given, else ``cogvlm2_layers.attention`` on the split heads."""

    def __init__(self, config, dtype, kernels: VisionKernels):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.scale = self.head_dim ** -0.5
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size, True, dtype, kernels.matmul,
                                      kernels.linear)
        self.dense = Linear(config.hidden_size, config.hidden_size, True, dtype, kernels.matmul, kernels.linear)
        self.kernel = kernels.attention
        self.heads = Tensor(np.array([self.num_heads], np.int32))

    def _heads(self, x):
        t, length, _ = x.shape
        return x.reshape(t, length, self.num_heads, self.head_dim).swapaxes(1, 2)  # (T, heads, 257, d)

    def mix(self, x):
        """The heads' outputs before ``dense``: (T, 257, C) -> (T, 257, C)."""
        t, length, _ = x.shape
        qkv = self.query_key_value(x)                                               # (T, 257, 3C)
        if self.kernel is None:
            q, k, v = ops.split(qkv, self.num_heads * self.head_dim, -1)            # 3 x (T, 257, C)
            out = attention(self._heads(q), self._heads(k), self._heads(v), None, self.scale)
            return out.swapaxes(1, 2).reshape(t, length, -1)
        return self.kernel(qkv, self.heads)                                         # (T, 257, C)

    def construct(self, x):
        return self.dense(self.mix(x))


class MLP(nn.Cell):
    """fc1 -> exact GELU -> fc2, with biases."""

    def __init__(self, config, dtype, kernels: VisionKernels):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, True, dtype, kernels.matmul, kernels.linear)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, True, dtype, kernels.matmul, kernels.linear)
        self.gelu_kernel = kernels.gelu
        self.linear_gelu = kernels.linear_gelu

    def hidden(self, x):
        """GELU(fc1(x)), fc2's input: (..., C) -> (..., I); in one kernel with ``linear_gelu`` unless fc1 is
        no longer a plain Linear (a LoRA layer keeps its own forward)."""
        if self.linear_gelu is not None and isinstance(self.fc1, Linear):
            return self.fc1.fused(self.linear_gelu, x)
        return gelu(self.fc1(x), self.gelu_kernel)

    def construct(self, x):
        return self.fc2(self.hidden(x))


class TransformerLayer(nn.Cell):
    """EVA2 layer, post-norm inside the residual: h = x + LN(attn(x)); out = h + LN(mlp(h)). With
    ``kernels.linear_norm_add`` each branch's last Linear, its LayerNorm and the residual add are one kernel."""

    def __init__(self, config, dtype, kernels: VisionKernels):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype, kernels.layer_norm)
        self.attention = Attention(config, dtype, kernels)
        self.mlp = MLP(config, dtype, kernels)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype,
                                                  kernels.layer_norm)
        self.linear_norm_add = kernels.linear_norm_add

    def construct(self, x):
        h = self._residual(x, self.attention.dense, self.attention.mix(x), self.input_layernorm)
        return self._residual(h, self.mlp.fc2, self.mlp.hidden(h), self.post_attention_layernorm)

    def _residual(self, residual, linear, x, norm):
        """residual + norm(linear(x)): (T, L, in) -> (T, L, C); in one kernel with ``linear_norm_add`` unless
        ``linear`` is no longer a plain Linear (a LoRA layer keeps its own forward)."""
        if self.linear_norm_add is None or not isinstance(linear, Linear):
            return residual + norm(linear(x))
        c = residual.shape[-1]
        return linear.fused(self.linear_norm_add, x, (norm.weight, norm.bias, norm.epsilon, residual.reshape(-1, c)))


class Transformer(nn.Cell):
    def __init__(self, config, dtype, kernels: VisionKernels):
        super().__init__()
        self.layers = nn.CellList([TransformerLayer(config, dtype, kernels)
                                   for _ in range(config.num_hidden_layers)])

    def construct(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Cell):
    """Adapter projection to the decoder width: linear_proj -> LayerNorm -> GELU -> SwiGLU."""

    def __init__(self, config, in_features: int, dtype, kernels: VisionKernels):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.linear_proj = Linear(in_features, hidden, False, dtype, kernels.matmul)
        self.norm1 = LayerNorm(hidden, config.adapter_layer_norm_eps, dtype, kernels.layer_norm)
        self.gate_proj = Linear(hidden, inner, False, dtype, kernels.matmul)
        self.dense_h_to_4h = Linear(hidden, inner, False, dtype, kernels.matmul)
        self.dense_4h_to_h = Linear(inner, hidden, False, dtype, kernels.matmul)
        self.gelu_kernel = kernels.gelu
        self.silu_mul = kernels.silu_mul
        self.gated = kernels.gated

    def construct(self, x):
        x = gelu(self.norm1(self.linear_proj(x)), self.gelu_kernel)
        return swiglu(x, self.gate_proj, self.dense_h_to_4h, self.dense_4h_to_h, silu_mul=self.silu_mul,
                      gated=self.gated)


class EVA2CLIPModel(nn.Cell):
    """Frames (T, 3, 224, 224) -> decoder-width embeddings (T, 66, hidden): boi, 8x8 patches, eoi."""

    def __init__(self, config, kernels: VisionKernels = VisionKernels()):
        super().__init__()
        vision = config.vision_config
        dtype = to_ms_dtype(config.param_init_type)
        self.compute_dtype = to_ms_dtype(config.compute_dtype)
        self.grid_size = vision.grid_size
        self.patch_embedding = PatchEmbedding(vision, dtype, kernels)
        self.transformer = Transformer(vision, dtype, kernels)
        self.linear_proj = GLU(config, vision.hidden_size, dtype, kernels)
        self.conv = Conv2d(vision.hidden_size, vision.hidden_size, config.adapter_conv_size, dtype, kernels.linear)
        self.conv_size = config.adapter_conv_size
        self.boi = Parameter(placeholder((1, 1, config.hidden_size), dtype), name="boi")
        self.eoi = Parameter(placeholder((1, 1, config.hidden_size), dtype), name="eoi")

    @ms.jit   # compiled as a graph in PYNATIVE_MODE too
    def construct(self, images):
        x = self.patch_embedding(images.astype(self.compute_dtype))  # (T, 257, Cv)
        x = self.transformer(x)
        x = x[:, 1:]                                            # drop CLS: (T, 256, Cv)
        t, _, c = x.shape
        g, k = self.grid_size, self.conv_size
        if self.conv.linear is None:
            x = x.reshape(t, g, g, c).transpose(0, 3, 1, 2)     # (T, Cv, 16, 16)
            x = self.conv(x)                                    # (T, Cv, 8, 8)
            x = x.reshape(t, c, -1).swapaxes(1, 2)              # (T, 64, Cv)
        else:                                                   # its 2 x 2 patches as rows, channels last
            x = x.reshape(t, g // k, k, g // k, k, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, k * k * c)
            x = self.conv.on_patches(x, channels_last=True).reshape(t, (g // k) ** 2, -1)   # (T, 64, Cv)
        x = self.linear_proj(x)                                 # (T, 64, H)
        h = x.shape[-1]
        boi = ops.broadcast_to(self.boi, (t, 1, h))
        eoi = ops.broadcast_to(self.eoi, (t, 1, h))
        return ops.concat((boi, x, eoi), 1)                     # (T, 66, H)
