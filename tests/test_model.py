"""The model against the official implementation's outputs on the golden tiny checkpoint."""
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms

from cogvlm2 import CogVLM2Config, CogVLM2ForVideo
from cogvlm2.cogvlm2_cpu_kernels import amx_available

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "tiny_chat")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny_ms"
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_weight.py"), "--model", "cogvlm2",
                    "--input_path", TINY, "--output_path", str(out), "--dtype", "bf16"], check=True)
    return str(out)


@pytest.fixture(scope="module")
def model(converted):
    return CogVLM2ForVideo.from_pretrained(converted)


@pytest.fixture(scope="module")
def video_logits(model, golden):
    return model(golden["input_ids"], pixel_values=golden["pixel_values"],
                 token_type_ids=golden["token_type_ids"], position_ids=golden["position_ids"]).asnumpy()[0]


def maxdiff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# Tolerances: 10x the larger of what this code achieves against golden.npz (measured on the CI machine
# kind, 2-core x86 CPU, MindSpore 2.7.2) and what the reference itself varies by across machines
# (issue #13: vision embeddings 1.5e-9, logits 1.5e-7, hidden states 1.2e-6).
# 2e-5: 10x the 1.7e-6 this code achieves (conv of 588 terms, values up to 2.0); no cross-machine figure.
PATCH_EMBED_TOL = 2e-5
# 3e-5: 10x the 2.7e-6 this code achieves (values up to 6.2); no cross-machine figure.
VISION_TRANSFORMER_TOL = 3e-5
# 2e-8: 10x the 2.1e-9 this code achieves; the reference's own cross-machine spread is 1.5e-9.
VISION_EMBEDS_TOL = 2e-8
# 4e-8: 10x the 3.7e-9 this code achieves at the decoder layers' inputs (values up to 0.06, the
# magnitude of the vision embeddings, whose reference spread is 1.5e-9).
LAYER_INPUT_TOL = 4e-8
# 1.2e-5: 10x the reference's cross-machine spread of 1.2e-6 (this code achieves 1.2e-6 on the final
# norm output, values up to 2.9).
FINAL_NORM_TOL = 1.2e-5
# 2e-6: 10x the 1.8e-7 this code achieves on logits with the portable attention (8x the 2.4e-7 with the
# prefill attention kernel); the reference's own cross-machine spread is 1.5e-7.
LOGITS_TOL = 2e-6
# 1e-5: 10x the 9.1e-7 this code achieves on the log-sum-exp over 128256 logits (the reference sums
# them in float32; we sum in float64).
LOGSUMEXP_TOL = 1e-5


def assert_hidden_states(states, reference):
    """Input embeddings and layer inputs at LAYER_INPUT_TOL, the final norm output at FINAL_NORM_TOL."""
    assert len(states) == len(reference)
    for i, (ours, ref) in enumerate(zip(states, reference)):
        tol = FINAL_NORM_TOL if i == len(reference) - 1 else LAYER_INPUT_TOL
        assert maxdiff(ours[0], ref) <= tol, (i, maxdiff(ours[0], ref), tol)


def test_vision_tower_stages(model, golden):
    """The two debug keys: frame 0 after the patch embedding (conv, CLS, positions) and after the
    transformer layers, before the adapter."""
    vision = model.model.vision
    pixels = ms.Tensor(golden["pixel_values"][:1])
    patches = vision.patch_embedding(pixels)
    assert maxdiff(patches.asnumpy()[0], golden["debug_vision_patch_embed_frame0"]) <= PATCH_EMBED_TOL
    out = vision.transformer(patches).asnumpy()[0]
    assert maxdiff(out, golden["debug_vision_transformer_out_frame0"]) <= VISION_TRANSFORMER_TOL


def test_vision_embeds(model, golden):
    embeds = model.encode_video(golden["pixel_values"])
    assert embeds.shape == golden["vision_embeds"].shape == (6, 66, 32)
    assert maxdiff(embeds.asnumpy(), golden["vision_embeds"]) <= VISION_EMBEDS_TOL


def test_vision_runs_any_frame_count_in_chunks(model, golden):
    """11 frames (the golden 6, then its first 5 again) run as chunks of 6, 3, 1 and 1 frames: every
    frame's embeddings are the reference's for that frame."""
    assert model.vision_graph_frames() == (6, 3, 1)
    pixels = np.concatenate([golden["pixel_values"], golden["pixel_values"][:5]])
    embeds = model.encode_video(pixels).asnumpy()
    assert embeds.shape == (11, 66, 32)
    expected = np.concatenate([golden["vision_embeds"], golden["vision_embeds"][:5]])
    assert maxdiff(embeds, expected) <= VISION_EMBEDS_TOL


def test_mindspore_ops_match_the_reference(model, converted, golden):
    """``vision_kernels`` auto runs the CPU GELU/LayerNorm/attention/SiLU*up kernels here,
    ``decoder_kernels`` auto the decoder's RMSNorm, SiLU*up and attention kernels, and ``gemm`` auto the
    AMX product where the CPU has it; ``ops`` with ``onednn`` (MindSpore's, what Ascend runs) must match
    the reference as well."""
    layer = model.model.vision.transformer.layers[0]
    assert None not in (layer.mlp.gelu_kernel, layer.input_layernorm.kernel, layer.attention.kernel)
    assert (layer.mlp.fc1.kernel is not None) == amx_available()
    assert (layer.mlp.fc1.biased is not None) == (layer.attention.dense.biased is not None) == amx_available()
    assert model.model.vision.linear_proj.gate_proj.biased is None              # no bias: the plain product
    assert (model.step.matmul is not None) == amx_available()
    decoder = model.model.layers[0]
    assert None not in (model.step.attend, decoder.input_layernorm.kernel, decoder.mlp.language_mlp.silu_mul,
                        model.model.norm.kernel, model.model.vision.linear_proj.silu_mul)
    portable = CogVLM2ForVideo.from_pretrained(converted, vision_kernels="ops", gemm="onednn",
                                               decoder_kernels="ops")
    layer = portable.model.vision.transformer.layers[0]
    assert (layer.mlp.gelu_kernel, layer.input_layernorm.kernel, layer.attention.kernel) == (None, None, None)
    assert layer.mlp.fc1.kernel is None and layer.attention.query_key_value.kernel is None
    assert layer.mlp.fc1.biased is None and layer.attention.query_key_value.biased is None
    assert portable.step.matmul is None and portable.step.attend is None
    decoder = portable.model.layers[0]
    assert (decoder.input_layernorm.kernel, decoder.mlp.language_mlp.silu_mul, portable.model.norm.kernel) == \
        (None, None, None)
    assert portable.model.vision.linear_proj.silu_mul is None
    assert portable.model.vision.linear_proj.gelu_kernel is None
    assert portable.model.vision.linear_proj.norm1.kernel is None
    embeds = portable.encode_video(golden["pixel_values"]).asnumpy()
    assert maxdiff(embeds, golden["vision_embeds"]) <= VISION_EMBEDS_TOL
    logits = portable(golden["input_ids"], vision_embeds=embeds, token_type_ids=golden["token_type_ids"],
                      position_ids=golden["position_ids"]).asnumpy()[0]
    assert maxdiff(logits[golden["logits_last8_positions"]], golden["logits_last8"]) <= LOGITS_TOL
    assert np.array_equal(logits.argmax(-1), golden["logits_argmax"])


def test_hidden_states(model, golden):
    states = model.hidden_states(golden["input_ids"], pixel_values=golden["pixel_values"],
                                 token_type_ids=golden["token_type_ids"], position_ids=golden["position_ids"])
    assert_hidden_states(states, golden["hidden_states"])


def test_logits(video_logits, golden):
    assert video_logits.shape == (412, 128256) and video_logits.dtype == np.float32
    assert maxdiff(video_logits[golden["logits_last8_positions"]], golden["logits_last8"]) <= LOGITS_TOL
    assert np.array_equal(video_logits.argmax(-1), golden["logits_argmax"])
    assert maxdiff(video_logits.max(-1), golden["logits_max"]) <= LOGITS_TOL
    logits64 = video_logits.astype(np.float64)
    top = logits64.max(-1, keepdims=True)
    lse = np.log(np.exp(logits64 - top).sum(-1)) + top[:, 0]
    assert maxdiff(lse, golden["logits_logsumexp"]) <= LOGSUMEXP_TOL
    assert maxdiff(video_logits[golden["logits_vision_row_position"]], golden["logits_vision_row"]) <= LOGITS_TOL


def test_text_only(model, golden):
    kwargs = dict(token_type_ids=golden["text_token_type_ids"], position_ids=golden["text_position_ids"])
    states = model.hidden_states(golden["text_input_ids"], **kwargs)
    assert_hidden_states(states, golden["text_hidden_states"])
    logits = model(golden["text_input_ids"], **kwargs).asnumpy()[0]
    assert maxdiff(logits[-1], golden["text_logits_last"]) <= LOGITS_TOL
    assert np.array_equal(logits.argmax(-1), golden["text_logits_argmax"])


def test_hf_and_converted_directories_agree(video_logits, golden):
    from_hf = CogVLM2ForVideo.from_pretrained(TINY)
    logits = from_hf(golden["input_ids"], pixel_values=golden["pixel_values"],
                     token_type_ids=golden["token_type_ids"], position_ids=golden["position_ids"]).asnumpy()[0]
    assert np.array_equal(logits, video_logits)


def test_config_from_hf_json():
    config = CogVLM2Config.from_hf_config(TINY)
    assert (config.hidden_size, config.num_attention_heads, config.num_multi_query_heads) == (32, 4, 2)
    assert config.vision_config.hidden_size == 64 and config.vision_config.num_hidden_layers == 2
    assert config.vision_tokens_per_frame == 66 and config.image_size == 224
    assert config.rope_theta == 500000 and config.max_position_embeddings == 2048
    real = CogVLM2Config()
    assert (real.head_dim, real.kv_size, real.vision_tokens_per_frame) == (128, 1024, 66)


def test_config_rejects_bad_values():
    from cogvlm2.cogvlm2_config import CogVLM2ConfigError
    with pytest.raises(CogVLM2ConfigError, match="num_multi_query_heads"):
        CogVLM2Config(num_attention_heads=32, num_multi_query_heads=5)
    with pytest.raises(CogVLM2ConfigError, match="expert_set"):
        CogVLM2Config(expert_set="audio")


def test_left_padded_batch_rows_equal_golden(model, golden, meta):
    """The text-only prompt left-padded to the video prompt's length, in one batch with it (as
    CogVLM2Processor builds it): each row's logits are the reference's for that prompt alone."""
    from cogvlm2 import CogVLM2Processor, CogVLM2Tokenizer
    video = os.path.join(FIXTURES, "bigbuckbunny.mp4")
    batch = CogVLM2Processor(CogVLM2Tokenizer())([[{"text": meta["prompt"]}], [{"video": video}, {"text": meta["prompt"]}]])
    length, n_text = meta["seq_len"], meta["text_seq_len"]
    assert batch["attention_mask"][0].tolist() == [0] * (length - n_text) + [1] * n_text   # left padding
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], token_type_ids=batch["token_type_ids"],
                   position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]).asnumpy()
    assert maxdiff(logits[0, -1], golden["text_logits_last"]) <= LOGITS_TOL
    assert np.array_equal(logits[0, -n_text:].argmax(-1), golden["text_logits_argmax"])
    assert maxdiff(logits[1, golden["logits_last8_positions"]], golden["logits_last8"]) <= LOGITS_TOL
