"""CogVLM2Engine: continuous batching gives every request its single-run tokens (the official model's
greedy tokens where golden data exists), cancellation, seeded sampling in a busy batch, the vision
cache, streaming, per-request failures and option checks."""
import os
import threading

import cv2
import numpy as np
import pytest
import mindspore as ms

from cogvlm2 import CogVLM2Engine, CogVLM2Error, GenerationOptionError, generate
from cogvlm2.cogvlm2_engine import VisionCache
from cogvlm2.cogvlm2_errors import CogVLM2InputError, ContextLengthError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "tiny_chat")
VIDEO = os.path.join(FIXTURES, "bigbuckbunny.mp4")
PROMPT = "Please describe this video."
HISTORY = [("What animal is shown?", "A big rabbit.")]
HIST_QUERY = "What happens next?"

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


@pytest.fixture(scope="module", params=["slots", "concat"])
def engine(request):
    """Both batch KV caches: the CPU slot cache (written in place) and the portable functional one."""
    with CogVLM2Engine.from_pretrained(TINY, max_batch_size=4, kv_cache=request.param) as eng:
        assert (eng.model.slot_step is not None) == (request.param == "slots")
        yield eng


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A still picture: the fixture video's frame 50 written as PNG."""
    import decord  # noqa: F401  (after mindspore, see README)
    frames, _ = __import__("cogvlm2").CogVLM2Processor().load_video(VIDEO)
    path = str(tmp_path_factory.mktemp("img") / "frame.png")
    cv2.imwrite(path, cv2.cvtColor(frames[2], cv2.COLOR_RGB2BGR))
    return path


def single_run(engine, text, video=None, image=None, history=None, **options):
    """The request run alone through the static generate() path (not the engine's batching), on the
    engine's model thread: MindSpore graphs must not run on two threads at once."""
    inputs = engine.processor(text=text, video=video or image, history=history)
    keys = ("input_ids", "token_type_ids", "position_ids", "attention_mask", "pixel_values")
    run = lambda: generate(engine.model, **{k: inputs[k] for k in keys}, **options)  # noqa: E731
    return engine.call_on_model_thread(run).new_tokens[0].tolist()


def wait_for_tokens(handle, count):
    for seen, _ in enumerate(handle.tokens(timeout=120), 1):
        if seen >= count:
            return


def test_scripted_arrivals_each_get_their_single_run_tokens(engine, golden, image_path):
    """Requests join while others are mid-decode; each gets exactly its single-run greedy tokens."""
    a = engine.submit(PROMPT, video=VIDEO, max_new_tokens=20)
    wait_for_tokens(a, 3)
    b = engine.submit(PROMPT, max_new_tokens=20)                          # text, while a decodes
    wait_for_tokens(b, 2)
    c = engine.submit(HIST_QUERY, video=VIDEO, history=HISTORY, max_new_tokens=12)
    d = engine.submit("What is in this picture?", image=image_path, max_new_tokens=9)
    wait_for_tokens(d, 1)
    e = engine.submit(PROMPT, video=VIDEO, max_new_tokens=20)             # a's video again, later
    assert a.result(120).new_tokens == golden["gen_new_tokens"].tolist()
    assert b.result(120).new_tokens == golden["text_gen_new_tokens"].tolist()
    assert e.result(120).new_tokens == golden["gen_new_tokens"].tolist()
    assert c.result(120).new_tokens == single_run(engine, HIST_QUERY, VIDEO, history=HISTORY, max_new_tokens=12)
    assert d.result(120).new_tokens == single_run(engine, "What is in this picture?", image=image_path,
                                                  max_new_tokens=9)
    assert d.result().frames == 1 and a.result().frame_indices == [0, 25, 50, 75, 100, 125]
    assert a.result().prompt_tokens == 412 and a.result().finish_reason == "length"


def test_step_graph_compiles_once_across_batches(engine):
    engine.warmup()                                                   # every vision graph
    assert len(engine.model.model.vision.compile_cache) == len(engine.model.vision_graph_frames())
    engine.generate([{"text": PROMPT, "video": VIDEO}, "Hi", "A longer question about nothing at all?"],
                    max_new_tokens=4)
    assert len(engine.model.step.compile_cache) == 1
    # the vision tower has static graphs (vision_batch_frames frames, half as many, ... one), and so have the
    # slot-cache decode steps (kv_cache; one per padded batch size and cache shape, all compiled by
    # warmup): once they exist, new videos, prompt lengths and batch sizes compile nothing more
    static = [g for g in (engine.model.model.vision, engine.model.slot_step, engine.model.slot_rows_step) if g]
    counts = [len(g.compile_cache) for g in static]
    engine.generate([{"text": "Again?", "video": VIDEO}, {"text": "More?", "video": np.zeros((4, 40, 50, 3), np.uint8)},
                     "Short", "A much longer question, to make the prompt longer than the others in this batch?"],
                    max_new_tokens=3)
    assert [len(g.compile_cache) for g in static] == counts
    assert len(engine.model.step.compile_cache) == 1
    decode_step = engine.model.decode_step                 # several-sequence decode (decode_matmul)
    assert decode_step is None or len(decode_step.compile_cache) == 1


@pytest.mark.parametrize("kv_cache", ["slots", "concat"])
def test_cancel_frees_the_slot_and_leaves_the_others_alone(golden, kv_cache):
    with CogVLM2Engine.from_pretrained(TINY, max_batch_size=2, kv_cache=kv_cache) as eng:
        keep = eng.submit(PROMPT, video=VIDEO, max_new_tokens=20)
        doomed = eng.submit(PROMPT, max_new_tokens=200)
        wait_for_tokens(doomed, 3)
        doomed.cancel()
        late = eng.submit(PROMPT, max_new_tokens=20)     # needs the cancelled request's slot (batch 2)
        out = doomed.result(120)
        assert out.finish_reason == "cancelled" and 3 <= len(out.new_tokens) < 200
        assert keep.result(120).new_tokens == golden["gen_new_tokens"].tolist()
        assert late.result(120).new_tokens == golden["text_gen_new_tokens"].tolist()
        assert eng.snapshot().running == 0


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(engine):
    options = dict(do_sample=True, top_k=20, temperature=1.3, seed=11, max_new_tokens=12)
    alone = engine.submit(PROMPT, **options).result(120).new_tokens
    busy = [engine.submit(PROMPT, video=VIDEO, max_new_tokens=16)]
    wait_for_tokens(busy[0], 2)
    sampled = engine.submit(PROMPT, **options)
    busy.append(engine.submit("Another question?", max_new_tokens=16))
    assert sampled.result(120).new_tokens == alone
    assert alone != single_run(engine, PROMPT, max_new_tokens=12)          # it really sampled
    for handle in busy:
        handle.result(120)


def test_streaming_pieces_equal_the_final_text(engine, meta):
    handle = engine.submit(PROMPT, video=VIDEO, max_new_tokens=20)
    pieces = list(handle)
    assert "".join(pieces) == meta["gen_decoded"] == handle.result().text
    assert len(pieces) > 1


def test_follow_up_turns_reuse_the_frame_embeddings(monkeypatch):
    with CogVLM2Engine.from_pretrained(TINY) as eng:
        calls = []
        original = eng.model.encode_video
        monkeypatch.setattr(eng.model, "encode_video", lambda pixels: calls.append(1) or original(pixels))
        first = eng.submit("What animal is shown?", video=VIDEO, max_new_tokens=6).result(120).text
        history = [("What animal is shown?", first)]
        second = eng.submit(HIST_QUERY, video=VIDEO, history=history, max_new_tokens=6).result(120)
        assert len(calls) == 1                                 # the second turn did not run the tower
        assert second.frame_indices == [0, 25, 50, 75, 100, 125]
        assert second.new_tokens == single_run(eng, HIST_QUERY, VIDEO, history=history, max_new_tokens=6)


def test_vision_cache_never_grows_past_its_bound():
    cache = VisionCache(max_mb=1)
    block = ms.Tensor(np.zeros((66 * 2, 1024), np.float32))       # 528 KiB
    for key in range(5):
        cache.put(key, block, None)
        assert cache.bytes <= cache.max_bytes
    assert len(cache) == 1 and cache.get(4) is not None and cache.get(0) is None
    cache.put("huge", ms.Tensor(np.zeros((1024, 1024), np.float32)), None)   # 4 MiB: never stored
    assert cache.get("huge") is None and cache.bytes <= cache.max_bytes


@pytest.mark.parametrize("bad, message", [
    ("missing.mp4", "video file not found: 'missing.mp4'"),
    (__file__, "is a text file, not a video"),
])
def test_a_bad_video_fails_alone(engine, golden, bad, message):
    good = engine.submit(PROMPT, max_new_tokens=20)
    try:
        handle = engine.submit(PROMPT, video=bad, max_new_tokens=5)
    except CogVLM2InputError as err:                       # checked before queueing
        assert message in str(err)
    else:
        with pytest.raises(CogVLM2InputError, match=message):
            handle.result(60)
    assert good.result(120).new_tokens == golden["text_gen_new_tokens"].tolist()


def test_a_corrupt_video_fails_on_its_handle(engine, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(open(VIDEO, "rb").read()[:5000])     # truncated: header only
    handle = engine.submit(PROMPT, video=str(corrupt), max_new_tokens=5)
    with pytest.raises(CogVLM2InputError, match="corrupt.mp4"):
        handle.result(60)
    assert engine.submit("Still alive?", max_new_tokens=2).result(60).finish_reason == "length"


def test_frame_arrays_must_have_the_video_shape(engine):
    with pytest.raises(CogVLM2InputError, match=r"\(T, H, W, 3\).*pass it as image="):
        engine.submit(PROMPT, video=np.zeros((48, 64, 3), np.uint8))
    frames = np.zeros((2, 48, 64, 3), np.uint8)
    assert engine.submit(PROMPT, video=frames, max_new_tokens=2).result(60).frames == 2
    assert engine.submit(PROMPT, image=frames[0], max_new_tokens=2).result(60).frames == 1


@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": -3}, "max_new_tokens must be an integer >= 1, got -3"),
    ({"max_new_tokens": "5"}, "max_new_tokens must be an integer >= 1, got '5'"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
    ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"temperature": "hot"}, "temperature must be a number >= 0"),
    ({"do_sample": True, "temperature": 0}, "temperature must be > 0 when sampling"),
    ({"do_sample": "yes"}, "do_sample must be true or false"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a number > 0"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"stop_token_ids": "eos"}, "stop_token_ids must be a list of token ids"),
    ({"beams": 2}, "unknown generation option"),
])
def test_generation_options_are_checked_at_submit(engine, options, message):
    with pytest.raises(GenerationOptionError, match=message):
        engine.submit(PROMPT, **options)


def test_context_overflow_fails_on_the_handle(engine):
    handle = engine.submit(PROMPT, video=VIDEO, max_new_tokens=1700)
    with pytest.raises(ContextLengthError, match=r"412 tokens and 1700 new tokens"):
        handle.result(60)


def test_submit_is_safe_from_many_threads(engine, golden):
    results = {}

    def ask(i):
        results[i] = engine.submit(PROMPT, max_new_tokens=20).result(300).new_tokens

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(tokens == golden["text_gen_new_tokens"].tolist() for tokens in results.values())
    assert len(results) == 6


def closes_within(engine, seconds=60):
    closer = threading.Thread(target=engine.close, daemon=True)
    closer.start()
    closer.join(seconds)
    return not closer.is_alive()


def test_an_interrupt_inside_submit_leaves_close_working():
    """Ctrl-C's KeyboardInterrupt can land anywhere in the caller's thread, also inside submit() before
    the request reaches the preprocessing pool (run_predict.py hung in close() on that once in CI)."""
    eng = CogVLM2Engine.from_pretrained(TINY, max_batch_size=1)
    real_submit = eng._prep.submit

    def interrupted(*args):
        raise KeyboardInterrupt
    eng._prep.submit = interrupted
    with pytest.raises(KeyboardInterrupt):
        eng.submit(PROMPT, max_new_tokens=5)
    eng._prep.submit = real_submit
    assert eng.snapshot().waiting == 0
    assert eng.submit(PROMPT, max_new_tokens=2).result(120).finish_reason == "length"
    assert closes_within(eng)


def test_close_ends_a_request_lost_on_its_way_to_the_pool():
    """A request counted as preparing whose preprocessing never runs (the interrupt hit inside the
    pool's own submit): close() still returns, and the handle ends as cancelled instead of waiting forever."""
    eng = CogVLM2Engine.from_pretrained(TINY, max_batch_size=1)
    eng._prep.submit = lambda *args: None
    lost = eng.submit(PROMPT, max_new_tokens=5)
    assert closes_within(eng)
    assert lost.result(0).finish_reason == "cancelled"


def test_every_user_error_is_in_the_family():
    assert issubclass(GenerationOptionError, CogVLM2Error) and issubclass(ContextLengthError, CogVLM2Error)
    assert issubclass(CogVLM2InputError, CogVLM2Error)
