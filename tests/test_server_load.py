"""run_server.py under load, in a subprocess on 127.0.0.1 (bounded: 32 clients x 4 requests, time
limits): nothing lost, every greedy answer equals the golden answer in a busy batch, disconnects cancel,
no memory growth, then SIGTERM drains the requests in flight and the process exits 0. The server is
built from the checkpoint's config.json (no --config)."""
import concurrent.futures
import os
import signal
import threading
import time

import httpx
import openai
import psutil

from server_utils import REPO, serve_in_subprocess

FIXTURES = os.path.join(REPO, "tests", "fixtures")
PROMPT = "Please describe this video."
CLIENTS, PER_CLIENT = 32, 4


def messages(video: bool):
    if not video:
        return [{"role": "user", "content": PROMPT}]
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "bigbuckbunny.mp4"}},
                                         {"type": "text", "text": PROMPT}]}]


def one_request(base, client_index, request_index):
    """(kind, answer text or None for a deliberate disconnect)."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)
    video = (client_index + request_index) % 2 == 0
    if client_index % 8 == 7 and request_index == 1:              # 4 clients hang up mid-stream
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=300,
                          json={"messages": messages(video), "stream": True, "max_tokens": 1000}) as response:
            assert response.status_code == 200
            for count, _ in enumerate(response.iter_lines()):
                if count >= 4:
                    break
        return "cancelled", None
    if (client_index + request_index) % 3 == 0:
        chunks = client.chat.completions.create(model="cogvlm2-video", messages=messages(video), stream=True,
                                                max_tokens=20)
        return ("video" if video else "text"), "".join(c.choices[0].delta.content or "" for c in chunks)
    reply = client.chat.completions.create(model="cogvlm2-video", messages=messages(video), max_tokens=20)
    assert reply.usage.completion_tokens == 20
    return ("video" if video else "text"), reply.choices[0].message.content


def client_run(base, index):
    return [one_request(base, index, i) for i in range(PER_CLIENT)]


def metric(base, name):
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_load_then_sigterm(meta):
    expected = {"video": meta["gen_decoded"], "text": meta["text_gen_decoded"]}
    flags = ["--load_checkpoint", os.path.join(FIXTURES, "tiny_chat"), "--max_batch_size", "8",
             "--media_root", FIXTURES, "--shutdown_timeout", "60"]
    with serve_in_subprocess(*flags) as (base, process):
        server = psutil.Process(process.pid)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:    # warm-up: allocator pools, vision cache
            list(pool.map(lambda i: one_request(base, i, 0), range(8)))
        rss_warm = server.memory_info().rss
        cancelled_before = metric(base, "cogvlm2_engine_requests_cancelled_total")

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client_run, base, i) for i in range(CLIENTS)]
            results = [r for f in futures for r in f.result(timeout=240)]
        seconds = time.perf_counter() - start
        assert len(results) == CLIENTS * PER_CLIENT
        answered = [(kind, text) for kind, text in results if kind != "cancelled"]
        assert all(text == expected[kind] for kind, text in answered)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and httpx.get(f"{base}/health").json()["running"]:
            time.sleep(0.1)
        health = httpx.get(f"{base}/health", timeout=10).json()
        assert health == {"status": "ok", "running": 0, "waiting": 0}
        cancelled = metric(base, "cogvlm2_engine_requests_cancelled_total") - cancelled_before
        assert cancelled == len(results) - len(answered) == 4
        rss_after = server.memory_info().rss
        print(f"\nload: {len(results)} requests ({len(answered)} answered, {int(cancelled)} cancelled) from "
              f"{CLIENTS} clients in {seconds:.1f} s ({len(results) / seconds * 60:.0f} requests/min); batch "
              f"occupancy {metric(base, 'cogvlm2_batch_occupancy'):.2f}; RSS after warm-up "
              f"{rss_warm / 2 ** 20:.0f} MB, after the load {rss_after / 2 ** 20:.0f} MB "
              f"({rss_after / rss_warm:.3f}x)")
        assert rss_after <= 1.10 * rss_warm

        # SIGTERM with requests in flight: they finish, then the process exits 0
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=120)
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(client.chat.completions.create(
            model="cogvlm2-video", messages=messages(False), max_tokens=150))) for _ in range(3)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health").json()["running"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        assert process.wait(120) == 0
        assert [r.usage.completion_tokens for r in replies] == [150, 150, 150]
        log = process.stdout.read()
        assert "server stopped" in log, log
