"""param_init_type: bfloat16 on CPU: the Linear weights stay as the bf16 checkpoint stores them (their bit
patterns, uint16) and every product widens them exactly, so the model gives the bits of the float32 model
on the same checkpoint, from about half the weight bytes. The kernels that read the bits, the portable
path (MindSpore's MatMul on the widened values), loading, LoRA and the refusals."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from cogvlm2 import CogVLM2ForVideo
from cogvlm2.cogvlm2_checkpoints import save_hf_checkpoint
from cogvlm2.cogvlm2_cpu_kernels import (amx_available, amx_gated_op, amx_linear_gelu_op, amx_linear_norm_add_op,
                                         amx_linear_op, amx_matmul_op, rows_matmul_op, widen_bf16_op)
from cogvlm2.cogvlm2_errors import CheckpointError, CogVLM2ConfigError
from cogvlm2.cogvlm2_generation import generate
from cogvlm2.cogvlm2_layers import BF16_BITS, Linear
from cogvlm2.cogvlm2_lora import LoraConfig, apply_lora, merge_lora
from cogvlm2.cogvlm2_train import Trainable
from cogvlm2.cogvlm2_weights import convert_weight_dict, read_safetensors_raw

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_chat")
PORTABLE = dict(gemm="onednn", decode_matmul="onednn", vision_kernels="ops", decoder_kernels="ops", kv_cache="concat")

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
needs_amx = pytest.mark.skipif(not amx_available(), reason="this CPU (or kernel) gives no AMX-BF16 tiles")


def bf16_weights(rng, shape):
    """Random bfloat16 values: (their bits as uint16, the same values as float32)."""
    bits = (rng.standard_normal(shape, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


class WithWeights(nn.Cell):
    """``op(x, w0[, w1], *rest)`` with the one or two weights as Parameters, in a dynamic-row graph."""

    def __init__(self, op, weights):
        super().__init__()
        self.op = op
        self.w0 = Parameter(Tensor(weights[0]), name="w0")
        self.w1 = Parameter(Tensor(weights[1]), name="w1") if len(weights) > 1 else None

    def construct(self, x, *rest):
        if self.w1 is None:
            return self.op(x, self.w0, *rest)
        return self.op(x, self.w0, self.w1, *rest)


def same_bits_from_either_weights(op, weight_count, rest, k, n, rows, seed):
    """op on bfloat16-bit weights and on float32 weights with the same values: identical outputs."""
    rng = np.random.default_rng(seed)
    pairs = [bf16_weights(rng, (k, n)) for _ in range(weight_count)]
    cells = [WithWeights(op, [p[i] for p in pairs]) for i in (0, 1)]
    for cell in cells:
        cell.set_inputs(Tensor(shape=[None, k], dtype=ms.float32),          # a residual's rows follow x's
                        *[Tensor(shape=[None, n], dtype=ms.float32) if r.ndim == 2 else Tensor(r) for r in rest(1)])
    for m in rows:
        x = rng.standard_normal((m, k), dtype=np.float32)
        extra = [Tensor(r) for r in rest(m)]
        from_bits, from_float = (cell(Tensor(x), *extra).asnumpy() for cell in cells)
        assert np.array_equal(from_bits, from_float), (m, np.abs(from_bits - from_float).max())
        if weight_count == 1 and not rest(m):
            exact = x.astype(np.float64) @ pairs[0][1].astype(np.float64)
            assert np.abs(from_bits - exact).max() <= 1e-4 * np.sqrt(k)


# 1-15 rows: the rows kernel (also inside the AMX ops); 40 and 300: the tile paths, through the columns
# and (300 x 256 x 96) through the rows; tails of 16 columns and of 32 values of K.
SHAPES = [(256, 96), (37, 203), (1024, 300)]
ROWS = (1, 5, 15, 40, 300)


@pytest.mark.parametrize("k, n", SHAPES + [(4100, 70)])   # 1024 x 300, 4100 x 70: cut along K
def test_rows_kernel_reads_bfloat16_bits(k, n):
    same_bits_from_either_weights(rows_matmul_op(), 1, lambda m: [], k, n, (1, 2, 7, 16, 17), seed=k + n)


@needs_amx
@pytest.mark.parametrize("k, n", SHAPES)
def test_amx_products_read_bfloat16_bits(k, n):
    rng = np.random.default_rng(k * n)
    bias, norm_weight, norm_bias = (rng.standard_normal(n, dtype=np.float32) for _ in range(3))
    eps = np.array([1e-6], np.float32)
    residuals = {m: rng.standard_normal((m, n), dtype=np.float32) for m in ROWS}
    same_bits_from_either_weights(amx_matmul_op(), 1, lambda m: [], k, n, ROWS, seed=1)
    same_bits_from_either_weights(amx_linear_op(), 1, lambda m: [bias], k, n, ROWS, seed=2)
    same_bits_from_either_weights(amx_linear_gelu_op(), 1, lambda m: [bias], k, n, ROWS, seed=3)
    same_bits_from_either_weights(amx_linear_norm_add_op(), 1,
                                  lambda m: [bias, norm_weight, norm_bias, eps, residuals[m]], k, n, ROWS, seed=4)
    same_bits_from_either_weights(amx_gated_op(), 2, lambda m: [], k, n, ROWS, seed=5)


class Widen(nn.Cell):
    def __init__(self):
        super().__init__()
        self.widen = widen_bf16_op()

    def construct(self, bits):
        return self.widen(bits)


def test_widen_gives_the_exact_values():
    rng = np.random.default_rng(3)
    for shape in [(5,), (33, 17), (2, 3, 129)]:
        bits, values = bf16_weights(rng, shape)
        bits.flat[:3] = [0x7F80, 0xFF80, 0x8000]                    # inf, -inf, -0.0
        values = (bits.astype(np.uint32) << 16).view(np.float32)
        widened = Widen()(Tensor(bits)).asnumpy()
        assert widened.dtype == np.float32 and np.array_equal(widened.view(np.uint32), values.view(np.uint32))


# ----- the model on the golden tiny checkpoint (bf16, as the real one) ---------------------------------
def golden_inputs(golden):
    return {k: golden[k] for k in ("input_ids", "token_type_ids", "position_ids", "pixel_values")}


def outputs(model, golden):
    """Vision embeddings, the video prompt's logits, and 8 greedy tokens and their scores for two text
    prompts decoded together (the rows kernel in both models; one sequence decodes through oneDNN's
    mat-vec with float32 weights and through the rows kernel with bfloat16 ones: below)."""
    embeds = model.encode_video(golden["pixel_values"]).asnumpy()
    logits = model(**golden_inputs(golden)).asnumpy()
    two = {k: np.stack([golden["text_" + k]] * 2) for k in ("input_ids", "token_type_ids", "position_ids")}
    out = generate(model, **two, max_new_tokens=8, output_scores=True)
    return embeds, logits, out.new_tokens, np.stack(out.scores)


@pytest.mark.parametrize("kernels", ["auto", "portable"])
def test_bfloat16_weights_give_the_float32_bits(golden, kernels):
    """Both models load the same bf16 checkpoint; the bf16 one keeps its Linear weights as bits (half the
    bytes), every other parameter float32. With the CPU kernels and with MindSpore's ops on the widened
    weights the outputs are those of the float32 model, bit for bit; one sequence's decode, on another
    kernel than the float32 model's, gives the golden tokens and scores."""
    overrides = PORTABLE if kernels == "portable" else {}
    full = CogVLM2ForVideo.from_pretrained(TINY, **overrides)
    half = CogVLM2ForVideo.from_pretrained(TINY, param_init_type="bfloat16", **overrides)
    linear = {name for name, cell in half.cells_and_names() if isinstance(cell, Linear)}
    for name, param in half.parameters_and_names():
        is_weight = name.endswith(".weight") and name[:-len(".weight")] in linear
        kept_as_bits = is_weight or name == "model.embed_tokens.weight"
        assert param.dtype == (BF16_BITS if kept_as_bits else ms.float32), name
    size = lambda m: sum(p.asnumpy().nbytes for p in m.get_parameters())   # noqa: E731
    linear_bytes = sum(p.asnumpy().nbytes for n, p in half.parameters_and_names() if p.dtype == BF16_BITS)
    assert size(half) == size(full) - linear_bytes
    for ours, theirs in zip(outputs(half, golden), outputs(full, golden)):
        assert np.array_equal(ours, theirs)
    out = generate(half, **golden_inputs(golden), max_new_tokens=20, output_scores=True)
    assert out.new_tokens[0].tolist() == golden["gen_new_tokens"].tolist()
    scores = np.stack([s[0] for s in out.scores])
    top5 = np.argsort(-scores, -1, kind="stable")[:, :5]
    assert np.array_equal(top5, golden["gen_step_top5_ids"])
    # 2e-6: test_generation's bound (10x what the float32 model achieves)
    assert np.abs(np.take_along_axis(scores, top5, -1) - golden["gen_step_top5_values"]).max() <= 2e-6


def test_float32_checkpoint_values_bfloat16_cannot_hold_are_refused(tmp_path):
    model = CogVLM2ForVideo.from_pretrained(TINY)
    weight = model.lm_head.weight
    weight.set_data(Tensor(weight.asnumpy() * np.float32(1 + 2 ** -12)))   # beyond bfloat16's 8 bits
    save_hf_checkpoint(model, str(tmp_path / "fp32"), dtype="fp32")
    with pytest.raises(CheckpointError, match=r"lm_head\.weight in model\.safetensors holds float32 values that "
                                              r"bfloat16 would round; load it with model_config "
                                              r"param_init_type: float32"):
        CogVLM2ForVideo.from_pretrained(str(tmp_path / "fp32"), param_init_type="bfloat16")
    CogVLM2ForVideo.from_pretrained(str(tmp_path / "fp32"))                 # float32 keeps them


def test_bfloat16_model_saves_the_checkpoint_values(tmp_path):
    half = CogVLM2ForVideo.from_pretrained(TINY, param_init_type="bfloat16")
    save_hf_checkpoint(half, str(tmp_path / "again"), dtype="bf16")
    saved = {name: bits for name, _, bits in read_safetensors_raw(str(tmp_path / "again" / "model.safetensors"))}
    original = {}
    for shard in sorted(f for f in os.listdir(TINY) if f.endswith(".safetensors")):
        original.update({name: bits for name, _, bits in read_safetensors_raw(os.path.join(TINY, shard))})
    assert set(saved) == {name for name in original if not name.endswith(".rotary_emb.inv_freq")}   # a buffer
    for name in saved:
        assert np.array_equal(saved[name], original[name]), name


def test_mindformers_conversion_keeps_the_bits():
    """convert_weight_dict (mindformers' load_checkpoint of a HF directory): a bf16 tensor becomes the bits
    of the model's layout (transposed for a Linear weight); a float32 one bfloat16 cannot hold is refused."""
    half = CogVLM2ForVideo.from_pretrained(TINY, param_init_type="bfloat16")
    weight = half.lm_head.weight.asnumpy()                                  # (in, out) bits
    values = (weight.astype(np.uint32) << 16).view(np.float32)
    source = {"lm_head.weight": Parameter(Tensor(values.T.copy(), ms.bfloat16), name="lm_head.weight")}
    converted = convert_weight_dict(half, source)
    assert converted["lm_head.weight"].dtype == BF16_BITS
    assert np.array_equal(converted["lm_head.weight"].asnumpy(), weight)
    rounded_away = Parameter(Tensor(values.T * np.float32(1 + 2 ** -12)), name="lm_head.weight")
    with pytest.raises(CheckpointError, match="lm_head.weight in load_checkpoint holds float32 values"):
        convert_weight_dict(half, {"lm_head.weight": rounded_away})


def test_lora_runs_on_bfloat16_weights_and_merge_is_refused(golden):
    """A LoRA layer's base product widens the bits (its A and B are float32): the same logits as on the
    float32 model with the same adapter; merging would round the sums into bfloat16, so it is refused."""
    config = LoraConfig(4, 8, 0.0, ["language_expert_query_key_value", "dense_4h_to_h"])
    logits = []
    for dtype in ("float32", "bfloat16"):
        model = CogVLM2ForVideo.from_pretrained(TINY, param_init_type=dtype)
        ms.set_seed(0)
        apply_lora(model, config)
        rng = np.random.default_rng(1)
        for name, param in model.parameters_and_names():
            if name.endswith("lora_B"):
                param.set_data(Tensor(rng.standard_normal(param.shape, dtype=np.float32) * np.float32(0.01)))
        logits.append(model(**golden_inputs(golden)).asnumpy())
    assert np.array_equal(logits[0], logits[1])
    with pytest.raises(CogVLM2ConfigError, match="merging a LoRA adapter into bfloat16 weights would round"):
        merge_lora(model)


def test_fine_tuning_refuses_bfloat16_weights():
    half = CogVLM2ForVideo.from_pretrained(TINY, param_init_type="bfloat16")
    with pytest.raises(CogVLM2ConfigError, match="fine-tuning needs float32 weights, but model_config "
                                                 "param_init_type is bfloat16"):
        Trainable(half, [half.lm_head.weight])


def test_engine_batches_bfloat16_weights(golden):
    """The engine's continuous batching on bfloat16 weights (several sequences per step on the rows kernel,
    the slot cache, the vision cache): each request gets the reference's tokens."""
    from cogvlm2 import CogVLM2Engine
    video = os.path.join(os.path.dirname(__file__), "fixtures", "bigbuckbunny.mp4")
    with CogVLM2Engine.from_pretrained(TINY, max_batch_size=4, param_init_type="bfloat16") as engine:
        assert engine.model.lm_head.weight.dtype == BF16_BITS
        handles = [engine.submit("Please describe this video.", video=video, max_new_tokens=20),
                   engine.submit("Please describe this video.", max_new_tokens=20),
                   engine.submit("Please describe this video.", video=video, max_new_tokens=12)]
        results = [h.result(120).new_tokens for h in handles]
    assert results[0] == golden["gen_new_tokens"].tolist()
    assert results[1] == golden["text_gen_new_tokens"].tolist()
    assert results[2] == golden["gen_new_tokens"][:12].tolist()
