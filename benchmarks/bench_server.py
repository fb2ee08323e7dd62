"""Server benchmark: the OpenAI endpoint under 1, 4, 8 and 16 concurrent clients, on the bench model
(benchmarks/bench_config.json, random weights: a speed figure, not answers). A script, not a test.

    python benchmarks/bench_server.py [--clients 1 4 8 16] [--requests 32] [--max-tokens 64]

The server (create_app + uvicorn) runs in this process on 127.0.0.1; the clients are asyncio
streaming requests (so time to first token is seen as a client sees it), each asking about the golden
video (its frame embeddings are cached after the first request, as in a chat). Each level sends the
same number of requests (1 client: sent one after another = the sequential baseline). Prints
requests/min, generated tokens/s, p50/p95 latency and time to first token, and each level's throughput
over the sequential one, all from this one run.
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"))
    parser.add_argument("--video", default=os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per level (1 client: 1/4 of it)")
    parser.add_argument("--max-tokens", type=int, default=64)
    return parser.parse_args()


def build_engine(config_path: str, max_batch_size: int):
    import mindspore as ms
    from cogvlm2 import CogVLM2Config, CogVLM2Engine, CogVLM2ForVideo, CogVLM2Processor
    from cogvlm2.cogvlm2_loading import fill_random_weights
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    config = CogVLM2Config.from_hf_config(config_path, max_batch_size=max_batch_size)
    model = CogVLM2ForVideo(config)
    fill_random_weights(model)
    processor = CogVLM2Processor().apply_model_config(model.config)
    return CogVLM2Engine(model, processor, max_batch_size=max_batch_size)


async def one_request(http, url, body):
    """(latency s, ttft s, completion tokens) of one streamed request."""
    start = time.perf_counter()
    first, usage = None, None
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            elif first is None and data["choices"] and data["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    return end - start, (first or end) - start, usage["completion_tokens"]


async def level(base, clients, total, body):
    import httpx
    url = f"{base}/v1/chat/completions"
    per_client = max(1, total // clients)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def client():
            return [await one_request(http, url, body) for _ in range(per_client)]
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client() for _ in range(clients))) for r in rs]
        seconds = time.perf_counter() - start
    latency = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]  # noqa: E731
    return {"clients": clients, "requests": len(results), "seconds": seconds,
            "rpm": len(results) / seconds * 60, "tps": sum(r[2] for r in results) / seconds,
            "p50": statistics.median(latency), "p95": pct(latency, 0.95),
            "ttft50": statistics.median(ttft), "ttft95": pct(ttft, 0.95)}


def main():
    args = parse_args()
    os.environ.setdefault("GLOG_v", "3")
    from cogvlm2.cogvlm2_server import ServerSettings, create_app
    from cogvlm2.cogvlm2_server_media import MediaPolicy
    from server_utils import serve_in_thread
    engine = build_engine(args.config, max(args.clients))
    media_root = os.path.dirname(os.path.abspath(args.video))
    app = create_app(engine, ServerSettings(media=MediaPolicy(media_root=media_root), max_queue=256))
    body = {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": os.path.basename(args.video)}},
        {"type": "text", "text": "Please describe this video."}]}],
        "max_tokens": args.max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with engine, serve_in_thread(app) as base:
        asyncio.run(level(base, 1, 2, body))                          # warm the vision cache and the graphs
        rows = []
        for clients in args.clients:
            total = args.requests // 4 if clients == 1 else args.requests
            rows.append(asyncio.run(level(base, clients, max(total, clients), body)))
            print(f"  {clients} clients done ({rows[-1]['seconds']:.1f} s)", file=sys.stderr, flush=True)
    base_tps = rows[0]["tps"] if rows[0]["clients"] == 1 else None
    print(f"bench model ({os.path.relpath(args.config, REPO)}, random weights), golden video (6 frames, 412 prompt "
          f"tokens), max_tokens {args.max_tokens}, greedy, streamed; max_batch_size {max(args.clients)}")
    print("| clients | requests | requests/min | tokens/s | vs sequential | latency p50 / p95 (s) | TTFT p50 / p95 (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tps'] / base_tps:.2f}x" if base_tps else "-"
        print(f"| {r['clients']} | {r['requests']} | {r['rpm']:.1f} | {r['tps']:.1f} | {ratio} | "
              f"{r['p50']:.2f} / {r['p95']:.2f} | {r['ttft50']:.2f} / {r['ttft95']:.2f} |")


if __name__ == "__main__":
    main()
