"""Generation against the official implementation's greedy run, plus batching, sampling, stop tokens
and compile-once (the engine's streaming and multi-turn chat: test_engine.py)."""
import os

import numpy as np
import pytest
import mindspore as ms

from cogvlm2 import CogVLM2ForVideo, CogVLM2Processor, CogVLM2Tokenizer
from cogvlm2.cogvlm2_generation import ContextLengthError, generate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "tiny_chat")
VIDEO = os.path.join(FIXTURES, "bigbuckbunny.mp4")
PROMPT = "Please describe this video."

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


@pytest.fixture(scope="module")
def model():
    return CogVLM2ForVideo.from_pretrained(TINY)


@pytest.fixture(scope="module")
def processor():
    return CogVLM2Processor(CogVLM2Tokenizer())


def golden_inputs(golden, prefix=""):
    inputs = {k: golden[prefix + k] for k in ("input_ids", "token_type_ids", "position_ids")}
    if not prefix:
        inputs["pixel_values"] = golden["pixel_values"]
    return inputs


@pytest.mark.parametrize("prefix", ["", "text_"])
def test_greedy_tokens_and_scores_match_reference(model, golden, meta, processor, prefix):
    out = generate(model, **golden_inputs(golden, prefix), max_new_tokens=20, output_scores=True,
                         tokenizer=processor.tokenizer)
    assert out.new_tokens[0].tolist() == golden[prefix + "gen_new_tokens"].tolist()
    assert out.texts == [meta[prefix + "gen_decoded"]]                     # the answer, no prompt echo
    scores = np.stack([s[0] for s in out.scores])                         # (20, vocab)
    top5 = np.argsort(-scores, -1, kind="stable")[:, :5]
    assert np.array_equal(top5, golden[prefix + "gen_step_top5_ids"])
    # 2e-6: 10x the 1.2e-7 these logits achieve; the reference's own cross-machine spread is 1.5e-7
    assert np.abs(np.take_along_axis(scores, top5, -1) - golden[prefix + "gen_step_top5_values"]).max() <= 2e-6
    if not prefix:
        assert np.abs(scores[1] - golden["gen_step1_logits"]).max() <= 2e-6


def test_recompute_without_cache_gives_the_same_tokens(golden):
    """use_past: False re-runs the whole sequence each step, like the reference's use_cache=False."""
    model = CogVLM2ForVideo.from_pretrained(TINY, use_past=False)
    out = generate(model, **golden_inputs(golden), max_new_tokens=20)
    assert out.new_tokens[0].tolist() == golden["gen_new_tokens_nocache"].tolist()


def test_graphs_compile_once_for_all_lengths(model, golden):
    for prefix in ("", "text_", "hist_"):
        inputs = golden_inputs(golden, prefix)
        if prefix == "hist_":
            inputs["pixel_values"] = golden["pixel_values"]
        generate(model, **inputs, max_new_tokens=3)
    generate(model, np.stack([golden["text_input_ids"]] * 2), token_type_ids=np.stack([golden["text_token_type_ids"]] * 2),
                   position_ids=np.stack([golden["text_position_ids"]] * 2), max_new_tokens=2)
    # prompt lengths 412 / 10 / 424, batch 1 and 2, prefill and decode: one graph each
    assert len(model.step.compile_cache) == 1
    assert len(model.model.vision.compile_cache) == 1


def test_batch_equals_single(model, processor):
    queries = [[{"video": VIDEO}, {"text": PROMPT}],
               [{"text": PROMPT}],
               [{"video": VIDEO}, {"text": "What happens to the rabbit next? Answer in detail."}]]
    batch = processor(queries)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) == 3           # three different lengths
    keys = ("input_ids", "token_type_ids", "position_ids", "attention_mask", "pixel_values")
    together = generate(model, **batch, max_new_tokens=12)            # the processor's outputs as they are
    for query, tokens in zip(queries, together.new_tokens):
        alone = processor(query)
        single = generate(model, **{k: alone[k] for k in keys}, max_new_tokens=12)
        assert tokens.tolist() == single.new_tokens[0].tolist()


def test_frames_per_sample_must_match_the_frames(model, processor):
    batch = processor([[{"video": VIDEO}, {"text": PROMPT}], [{"text": PROMPT}]])
    batch["frames_per_sample"] = np.array([6, 2])
    with pytest.raises(ValueError, match="frames_per_sample sums to 8 but pixel_values holds 6 frames"):
        generate(model, **batch, max_new_tokens=2)


def test_sampling_is_seeded_and_respects_top_k(model, golden):
    inputs = golden_inputs(golden, "text_")
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=3, temperature=1.5, output_scores=True)
    a = generate(model, **inputs, seed=7, **kwargs)
    b = generate(model, **inputs, seed=7, **kwargs)
    assert a.new_tokens[0].tolist() == b.new_tokens[0].tolist()
    for token, scores in zip(a.new_tokens[0], a.scores):
        assert token in np.argsort(-scores[0])[:3]
    others = {tuple(generate(model, **inputs, seed=s, **kwargs).new_tokens[0].tolist()) for s in range(4)}
    assert len(others) > 1                                                 # the seed matters
    greedy = generate(model, **inputs, max_new_tokens=12, top_k=1, do_sample=True, seed=3)
    assert greedy.new_tokens[0].tolist() == golden["text_gen_new_tokens"][:12].tolist()


def test_top_p_keeps_the_nucleus():
    from cogvlm2.cogvlm2_generation import GenerationOptions, pick_next_tokens
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    options = GenerationOptions(do_sample=True, top_p=0.7)
    rng = np.random.default_rng(0)
    picks = {int(pick_next_tokens(logits, options, np.zeros((1, 0), np.int64), rng)[0]) for _ in range(200)}
    assert picks == {0, 1}


def test_stop_tokens_end_generation(model, golden):
    inputs = golden_inputs(golden)
    stop_at = int(golden["gen_new_tokens"][5])
    out = generate(model, **inputs, max_new_tokens=20, stop_token_ids=[stop_at])
    assert out.new_tokens[0].tolist() == golden["gen_new_tokens"][:6].tolist()


def test_stream_decoder_holds_split_characters(processor):
    from cogvlm2.cogvlm2_tokenizer import StreamDecoder
    tokenizer = processor.tokenizer
    text = "猫🐈 é"
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_context_overflow_is_a_clear_error(model, golden):
    with pytest.raises(ContextLengthError, match=r"412 tokens and 1700 new tokens.*2048"):
        generate(model, **golden_inputs(golden), max_new_tokens=1700)
