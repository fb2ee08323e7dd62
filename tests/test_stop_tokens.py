"""Decoding really stops at the default stop ids.

The tiny golden model never emits a stop token by itself, so a copy of its weights is edited: the
lm_head column of a stop id becomes (1 + 1e-3) x the column of the token the official greedy run
chose at step k. At step k that token's logit is the largest, so the stop id beats it by 0.1%; at the
other steps the copied column is not the maximum (asserted below by the unchanged prefix). So the
model emits the stop id exactly at step k and nowhere before.

Default stop ids (CogVLM2Config.stop_token_ids): 128001 <|end_of_text|> is ``eos_token_id`` of the
official config.json; 128009 <|eot_id|> is the second ``eos_token_id`` of the official
generation_config.json ([128001, 128009]), which the official demo's ``model.generate`` uses.
"""
import os

import numpy as np
import pytest
import mindspore as ms

from cogvlm2 import CogVLM2Config, CogVLM2Engine, CogVLM2ForVideo, CogVLM2Processor, generate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "tiny_chat")
VIDEO = os.path.join(FIXTURES, "bigbuckbunny.mp4")
PROMPT = "Please describe this video."
EOS, EOT = 128001, 128009
VIDEO_STOP_STEP, TEXT_STOP_STEP = 5, 8      # the video row emits EOS at step 5, the text row EOT at step 8

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


def test_the_defaults_are_the_official_stop_ids():
    assert CogVLM2Config().stop_token_ids == [EOS, EOT]


def edit_stop_columns(model, golden):
    """EOS wins at VIDEO_STOP_STEP of the video answer, EOT at TEXT_STOP_STEP of the text answer."""
    weight = model.lm_head.weight                         # (hidden, vocab): Linear keeps (in, out)
    values = weight.asnumpy().copy()
    values[:, EOS] = values[:, golden["gen_new_tokens"][VIDEO_STOP_STEP]] * np.float32(1.001)
    values[:, EOT] = values[:, golden["text_gen_new_tokens"][TEXT_STOP_STEP]] * np.float32(1.001)
    weight.set_data(ms.Tensor(values))


@pytest.fixture(scope="module")
def model(golden):
    model = CogVLM2ForVideo.from_pretrained(TINY)
    edit_stop_columns(model, golden)
    return model


@pytest.fixture(scope="module")
def processor():
    return CogVLM2Processor()


def count_steps(model, monkeypatch):
    """Shapes of the token ids of every forward pass: prefill and functional-cache decode (run_step),
    slot-cache decode (run_slot_step)."""
    calls = []
    for name in ("run_step", "run_slot_step"):
        original = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, original=original: calls.append(a[0].shape) or original(*a))
    return calls


def expected(golden, key, step, stop):
    return golden[key][:step].tolist() + [stop]


def test_generate_stops_at_each_default_stop_id(model, processor, golden, monkeypatch):
    video = processor(text=PROMPT, video=VIDEO)
    calls = count_steps(model, monkeypatch)
    out = generate(model, video["input_ids"], pixel_values=video["pixel_values"],
                   token_type_ids=video["token_type_ids"], position_ids=video["position_ids"], max_new_tokens=20)
    assert out.new_tokens[0].tolist() == expected(golden, "gen_new_tokens", VIDEO_STOP_STEP, EOS)
    assert len(calls) == 1 + VIDEO_STOP_STEP          # prefill, then one decode step per further token
    text = processor(text=PROMPT)
    out = generate(model, text["input_ids"], token_type_ids=text["token_type_ids"],
                   position_ids=text["position_ids"], max_new_tokens=20, tokenizer=processor.tokenizer)
    assert out.new_tokens[0].tolist() == expected(golden, "text_gen_new_tokens", TEXT_STOP_STEP, EOT)
    assert out.texts[0] == processor.tokenizer.decode(golden["text_gen_new_tokens"][:TEXT_STOP_STEP])


def test_a_batch_stops_each_row_at_its_own_step_and_ends_when_all_stopped(model, processor, golden,
                                                                          monkeypatch):
    batch = processor([[{"video": VIDEO}, {"text": PROMPT}], [{"text": PROMPT}]])
    calls = count_steps(model, monkeypatch)
    out = generate(model, **batch, max_new_tokens=20)
    assert out.new_tokens[0].tolist() == expected(golden, "gen_new_tokens", VIDEO_STOP_STEP, EOS)
    assert out.new_tokens[1].tolist() == expected(golden, "text_gen_new_tokens", TEXT_STOP_STEP, EOT)
    assert len(calls) == 1 + TEXT_STOP_STEP           # no step after the last row stopped (not 20)


def test_other_stop_ids_are_not_stops(model, processor, golden):
    text = processor(text=PROMPT)
    out = generate(model, text["input_ids"], token_type_ids=text["token_type_ids"],
                   position_ids=text["position_ids"], max_new_tokens=12, stop_token_ids=[EOS])
    tokens = out.new_tokens[0].tolist()
    assert tokens[TEXT_STOP_STEP] == EOT and len(tokens) == 12      # EOT emitted, but not a stop here


def test_engine_stops_streams_and_frees_the_slot(model, processor, golden, meta, monkeypatch):
    with CogVLM2Engine(model, processor, max_batch_size=1) as engine:
        calls = count_steps(model, monkeypatch)
        video = engine.submit(PROMPT, video=VIDEO, max_new_tokens=20)
        text = engine.submit(PROMPT, max_new_tokens=20)        # waits for the only slot
        pieces = list(video)
        first, second = video.result(120), text.result(120)
        assert engine.snapshot().running == 0
    assert first.new_tokens == expected(golden, "gen_new_tokens", VIDEO_STOP_STEP, EOS)
    assert first.finish_reason == "stop" and second.finish_reason == "stop"
    assert second.new_tokens == expected(golden, "text_gen_new_tokens", TEXT_STOP_STEP, EOT)
    assert "".join(pieces) == first.text == processor.tokenizer.decode(golden["gen_new_tokens"][:VIDEO_STOP_STEP])
    # batch 1: each request ran alone, prefill + its decode steps, and nothing after its stop
    assert len(calls) == (1 + VIDEO_STOP_STEP) + (1 + TEXT_STOP_STEP)
