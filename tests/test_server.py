"""The OpenAI-compatible server (cogvlm2/cogvlm2_server.py) with the real ``openai`` client, against
apps served by uvicorn on 127.0.0.1: greedy answers equal the official model's golden answer, usage,
every media route, multi-turn history, stop strings, streaming, disconnects, and every error status."""
import base64
import functools
import http.server
import logging
import os
import re
import shutil
import threading
import time
import wave

import cv2
import httpx
import numpy as np
import openai
import pytest

from cogvlm2 import CogVLM2Engine
from cogvlm2.cogvlm2_server import ServerSettings, create_app
from cogvlm2.cogvlm2_server_media import MediaPolicy
from server_utils import REPO, serve_in_thread

FIXTURES = os.path.join(REPO, "tests", "fixtures")
TINY = os.path.join(FIXTURES, "tiny_chat")
VIDEO = os.path.join(FIXTURES, "bigbuckbunny.mp4")
YAML = os.path.join(REPO, "configs", "cogvlm2", "predict_cogvlm2_video_tiny.yaml")
PROMPT = "Please describe this video."
MODEL = "cogvlm2-video"
HISTORY = [("What animal is shown?", "A big rabbit.")]     # the golden hist_* run
HIST_QUERY = "What happens next?"


@pytest.fixture(scope="module")
def engine():
    with CogVLM2Engine.from_config(YAML, load_checkpoint=TINY, max_batch_size=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    """The --media_root: the golden video, a picture, broken media, and a symlink pointing outside."""
    root = tmp_path_factory.mktemp("media")
    shutil.copy(VIDEO, root / "clip.mp4")
    frames, _ = CogVLM2Engine.__module__ and __import__("cogvlm2").CogVLM2Processor().load_video(VIDEO)
    cv2.imwrite(str(root / "frame.png"), cv2.cvtColor(frames[2], cv2.COLOR_RGB2BGR))
    data = open(VIDEO, "rb").read()
    (root / "corrupt.mp4").write_bytes(data[:len(data) // 3])
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("these are my notes, not a video\n")
    with wave.open(str(root / "audio.wav"), "wb") as w:          # audio only
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(np.zeros(8000, np.int16).tobytes())
    (root / "escape.mp4").symlink_to("/etc/passwd")
    (root.parent / "outside.mp4").write_bytes(data)
    return root


def make_app(engine, media_root=None, **settings):
    media = settings.pop("media", None) or MediaPolicy(media_root=str(media_root) if media_root else None)
    return create_app(engine, ServerSettings(media=media, **settings))


@pytest.fixture(scope="module")
def base_url(engine, media_root):
    with serve_in_thread(make_app(engine, media_root)) as url:
        yield url


@pytest.fixture()
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(path, mime):
    return f"data:{mime};base64," + base64.b64encode(open(path, "rb").read()).decode()


def video_message(url, text=PROMPT, kind="video"):
    return {"role": "user", "content": [{"type": f"{kind}_url", f"{kind}_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def ask(client, messages, **options):
    return client.chat.completions.create(model=MODEL, messages=messages, **options)


# ------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("route", ["path", "file_url", "data_url"])
def test_greedy_video_answer_equals_golden(client, media_root, meta, route):
    url = {"path": "clip.mp4", "file_url": f"file://{media_root}/clip.mp4",
           "data_url": data_url(VIDEO, "video/mp4")}[route]
    reply = ask(client, [video_message(url)], temperature=0)
    assert reply.choices[0].message.content == meta["gen_decoded"]
    assert reply.choices[0].finish_reason == "length"       # the YAML's max_new_tokens 20, no stop token
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (412, 20, 432)
    assert reply.model_extra["cogvlm2"] == {"frames": 6, "frame_indices": [0, 25, 50, 75, 100, 125]}


def test_stream_equals_golden_with_usage(client, meta, golden):
    chunks = list(ask(client, [video_message("clip.mp4")], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == meta["gen_decoded"]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert not chunks[-1].choices and (usage.prompt_tokens, usage.completion_tokens) == (412, len(golden["gen_new_tokens"]))


def test_text_only_answer_equals_golden(client, meta):
    reply = ask(client, [{"role": "user", "content": PROMPT}])
    assert reply.choices[0].message.content == meta["text_gen_decoded"]
    assert reply.usage.prompt_tokens == meta["text_seq_len"] == 10


def test_image_answer_equals_the_engine(client, engine, media_root):
    reply = ask(client, [video_message("frame.png", "What is in this picture?", kind="image")], max_tokens=9)
    alone = engine.submit("What is in this picture?", image=str(media_root / "frame.png"), max_new_tokens=9).result(120)
    assert reply.choices[0].message.content == alone.text
    assert reply.usage.prompt_tokens == alone.prompt_tokens == 1 + 66 + 1 + len(engine.tokenizer.encode(
        "Question: What is in this picture? Answer:"))
    assert reply.usage.completion_tokens == 9
    as_data = ask(client, [video_message(data_url(media_root / "frame.png", "image/png"), "What is in this picture?",
                                         kind="image")], max_tokens=9)
    assert as_data.choices[0].message.content == alone.text


def test_earlier_turns_become_history(client, engine, golden):
    (question, answer), = HISTORY
    messages = [video_message("clip.mp4", question), {"role": "assistant", "content": answer},
                {"role": "user", "content": HIST_QUERY}]
    reply = ask(client, messages, max_tokens=12)
    assert reply.usage.prompt_tokens == len(golden["hist_input_ids"])          # 424: the official prompt
    alone = engine.submit(HIST_QUERY, video=VIDEO, history=HISTORY, max_new_tokens=12).result(120)
    assert reply.choices[0].message.content == alone.text


def test_stop_string_cuts_the_answer_and_counts_tokens(client, engine, meta, golden):
    stop = " Bear"
    reply = ask(client, [video_message("clip.mp4")], stop=[stop, "never appears"])
    cut = meta["gen_decoded"].index(stop)
    assert reply.choices[0].message.content == meta["gen_decoded"][:cut]
    assert reply.choices[0].finish_reason == "stop"
    tokens = golden["gen_new_tokens"].tolist()
    needed = next(n for n in range(1, len(tokens) + 1) if stop in engine.tokenizer.decode(tokens[:n]))
    assert reply.usage.completion_tokens == needed
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(client, [video_message("clip.mp4")],
                                                                      stop=stop, stream=True))
    assert streamed == meta["gen_decoded"][:cut]


def test_seeded_sampling_repeats_and_differs_from_greedy(client, meta):
    options = dict(temperature=1.5, top_p=0.9, seed=7, max_tokens=12)
    first = ask(client, [{"role": "user", "content": PROMPT}], **options).choices[0].message.content
    second = ask(client, [{"role": "user", "content": PROMPT}], **options).choices[0].message.content
    assert first == second and first != meta["text_gen_decoded"]


def test_models_health_metrics_page_and_frames(client, base_url):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{base_url}/metrics").text
    for name in ("cogvlm2_http_requests_total", "cogvlm2_generated_tokens_total", "cogvlm2_queue_length",
                 "cogvlm2_batch_occupancy", "cogvlm2_time_to_first_token_seconds_bucket", "cogvlm2_errors_total"):
        assert name in metrics
    page = httpx.get(base_url)
    assert page.status_code == 200 and "<script>" in page.text and "/v1/chat/completions" in page.text
    frames = httpx.post(f"{base_url}/v1/frames", json={"url": "clip.mp4"}, timeout=60).json()["frames"]
    assert [f["index"] for f in frames] == [0, 25, 50, 75, 100, 125]
    assert [f["time"] for f in frames] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]              # 25 fps
    assert all(f["thumbnail"].startswith("data:image/jpeg;base64,") for f in frames)


def test_remote_media_when_allowed(engine, media_root, meta):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_root))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{files.server_address[1]}/clip.mp4"
    try:
        policy = MediaPolicy(allow_remote=True, max_bytes=os.path.getsize(VIDEO) + 10)
        with serve_in_thread(make_app(engine, media=policy, warmup=False)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
            assert ask(client, [video_message(remote)]).choices[0].message.content == meta["gen_decoded"]
            small = MediaPolicy(allow_remote=True, max_bytes=1000)
            with serve_in_thread(make_app(engine, media=small, warmup=False)) as url2:
                tiny_client = openai.OpenAI(base_url=f"{url2}/v1", api_key="x", max_retries=0, timeout=120)
                with pytest.raises(openai.APIStatusError) as err:
                    ask(tiny_client, [video_message(remote)])
                assert err.value.status_code == 413
    finally:
        files.shutdown()


# ------------------------------------------------------------------------------- cancellation
def test_client_disconnect_mid_stream_cancels_the_sequence(base_url, engine):
    before = engine.snapshot().cancelled
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                            "max_tokens": 1500}) as response:
        for count, _ in enumerate(response.iter_lines()):
            if count >= 6:
                break                                   # leave after a few tokens: the connection closes
    deadline = time.monotonic() + 10
    while engine.snapshot().cancelled == before and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = engine.snapshot()
    assert stats.cancelled == before + 1 and stats.running == 0


# ------------------------------------------------------------------------------- errors
def status_of(call):
    with pytest.raises(openai.APIStatusError) as err:
        call()
    return err.value.status_code, err.value.message


@pytest.mark.parametrize("url", ["../outside.mp4", "/etc/passwd", "file:///etc/passwd", "escape.mp4",
                                 "sub/../../outside.mp4", "http://127.0.0.1:9/clip.mp4"])
def test_media_outside_the_root_or_remote_is_refused(client, url):
    status, message = status_of(lambda: ask(client, [video_message(url)]))
    assert status == 403, message
    assert "media root" in message or "remote media is off" in message


def test_file_access_is_off_without_media_root(engine):
    with serve_in_thread(make_app(engine, warmup=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        status, message = status_of(lambda: ask(client, [video_message(VIDEO)]))
        assert status == 403 and "--media_root" in message


@pytest.mark.parametrize("name, words", [("corrupt.mp4", "cannot read video"), ("empty.mp4", "is empty"),
                                         ("notes.mp4", "text file"), ("audio.wav", "no video stream")])
def test_bad_video_fails_only_its_request(client, name, words, meta):
    status, message = status_of(lambda: ask(client, [video_message(name)]))
    assert status == 400 and words in message, message
    assert ask(client, [video_message("clip.mp4")]).choices[0].message.content == meta["gen_decoded"]


def test_bad_requests_name_the_problem(client, base_url):
    checks = [
        (lambda: ask(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
         400, "no system prompt"),
        (lambda: ask(client, [{"role": "user", "content": "Hi"}], n=2), 400, "n=2"),
        (lambda: ask(client, [video_message("clip.mp4")], max_tokens=2000), 400, "412 tokens and 2000 new"),
        (lambda: ask(client, [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}]), 400,
         "alternate"),
        (lambda: client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}]), 404,
         "gpt-4"),
        (lambda: ask(client, [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "a"}}]}]),
         422, "messages[0].content[0]"),
        (lambda: ask(client, [{"role": "user", "content": "Hi"}], max_tokens="many"), 422, "max_tokens"),
        (lambda: ask(client, [{"role": "user", "content": "Hi"}], temperature=-1), 422, "temperature"),
        (lambda: ask(client, [video_message("data:video/mp4;base64,!!notbase64")]), 400, "base64"),
        (lambda: ask(client, [video_message("clip.mp4"), {"role": "assistant", "content": "x"},
                              video_message("frame.png", kind="image")]), 400, "one per conversation"),
    ]
    for call, status, words in checks:
        got, message = status_of(call)
        assert (got, words in message) == (status, True), (message, status)
    raw = httpx.post(f"{base_url}/v1/chat/completions", content=b'{"messages": [', timeout=10,
                     headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    raw = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": "Hi"}, timeout=10)
    assert raw.status_code == 422 and "messages" in raw.json()["error"]["message"]


def test_size_limit_is_413_before_decoding(engine, media_root):
    with serve_in_thread(make_app(engine, media=MediaPolicy(media_root=str(media_root), max_bytes=4096),
                                  warmup=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        video = data_url(VIDEO, "video/mp4")
        status, message = status_of(lambda: ask(client, [video_message(video[:8000])]))   # the body fits
        assert status == 413 and "the data URL holds about" in message
        huge = "data:video/mp4;base64," + "A" * 2 ** 21                                  # the body does not
        status, message = status_of(lambda: ask(client, [video_message(huge)]))
        assert status == 413 and "the request body is" in message


def test_api_key(engine):
    with serve_in_thread(make_app(engine, api_key="s3cret", warmup=False)) as url:
        for key in ("wrong", ""):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key or "-", max_retries=0, timeout=60)
            assert status_of(lambda: ask(client, [{"role": "user", "content": "Hi"}]))[0] == 401
        assert httpx.get(f"{url}/v1/models").status_code == 401
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert ask(good, [{"role": "user", "content": "Hi"}], max_tokens=2).usage.completion_tokens == 2


def test_full_queue_is_429_with_retry_after(engine):
    with serve_in_thread(make_app(engine, max_queue=0, warmup=False)) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 1500}
        with httpx.Client(timeout=60) as http:
            streams = [http.stream("POST", f"{url}/v1/chat/completions", json=body) for _ in range(4)]
            opened = [s.__enter__() for s in streams]                  # 4 = max_batch_size in flight
            try:
                assert all(r.status_code == 200 for r in opened)
                refused = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=10)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            finally:
                for s in streams:
                    s.__exit__(None, None, None)
    deadline = time.monotonic() + 10
    while engine.snapshot().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.snapshot().running == 0


def test_internal_error_is_500_with_an_id_in_the_log(client, engine, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(engine, "submit", broken)
    with caplog.at_level(logging.ERROR, logger="cogvlm2.server"):
        status, message = status_of(lambda: ask(client, [{"role": "user", "content": "Hi"}]))
    error_id = re.search(r"id ([0-9a-f]{12})", message).group(1)
    assert status == 500 and any(error_id in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert ask(client, [{"role": "user", "content": "Hi"}], max_tokens=2).usage.completion_tokens == 2
