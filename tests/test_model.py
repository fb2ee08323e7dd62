"""The model against the official implementation's outputs on the golden tiny checkpoint."""
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms

from cogvlm2 import CogVLM2Config, CogVLM2ForVideo

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


def test_vision_embeds(model, golden):
    embeds = model.encode_video(golden["pixel_values"])
    assert embeds.shape == golden["vision_embeds"].shape == (6, 66, 32)
    assert maxdiff(embeds.asnumpy(), golden["vision_embeds"]) <= 1e-5


def test_hidden_states(model, golden):
    states = model.hidden_states(golden["input_ids"], pixel_values=golden["pixel_values"],
                                 token_type_ids=golden["token_type_ids"], position_ids=golden["position_ids"])
    assert len(states) == len(golden["hidden_states"])
    for ours, ref in zip(states, golden["hidden_states"]):
        assert maxdiff(ours[0], ref) <= 1e-5


def test_logits(video_logits, golden):
    assert video_logits.shape == (412, 128256) and video_logits.dtype == np.float32
    assert maxdiff(video_logits[golden["logits_last8_positions"]], golden["logits_last8"]) <= 2e-5
    assert np.array_equal(video_logits.argmax(-1), golden["logits_argmax"])
    assert maxdiff(video_logits.max(-1), golden["logits_max"]) <= 2e-5
    top = video_logits.max(-1, keepdims=True)
    lse = np.log(np.exp(video_logits - top).sum(-1)) + top[:, 0]
    assert maxdiff(lse, golden["logits_logsumexp"]) <= 2e-5
    assert maxdiff(video_logits[golden["logits_vision_row_position"]], golden["logits_vision_row"]) <= 2e-5


def test_text_only(model, golden):
    kwargs = dict(token_type_ids=golden["text_token_type_ids"], position_ids=golden["text_position_ids"])
    states = model.hidden_states(golden["text_input_ids"], **kwargs)
    for ours, ref in zip(states, golden["text_hidden_states"]):
        assert maxdiff(ours[0], ref) <= 1e-5
    logits = model(golden["text_input_ids"], **kwargs).asnumpy()[0]
    assert maxdiff(logits[-1], golden["text_logits_last"]) <= 2e-5
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
