"""Engine throughput: continuous batching vs the same requests one after another (a script that prints
figures, not a test).

    python benchmarks/bench_engine.py [--config benchmarks/bench_config.json] [--requests 16]
                                      [--new-tokens 64] [--batch 8]

Both runs happen in this one process on one model (random weights, the bench config), so the ratio
is measured under the same machine conditions. The requests mix three videos (the fixture video and
two clips cut from it at other lengths and sizes) with text-only questions, all submitted at once.
Printed: aggregate generated tokens/s and requests/min for each run and their ratio, p50/p95 time to
first token, the engine's warmup time (its graph compiles: the first engine compiles every graph, the
second the slot decode graphs of its batch sizes), and the decode step time at batch 8 over batch 1 (medians of repeated steps), for every
way the model can run a decode step, interleaved: as the engine ships (the slot cache written in place,
the rows kernel), the functional cache extended by concat with the rows kernel (the engine before the
slot cache; one row runs oneDNN) and with oneDNN only (the portable path). The engine runs use the
config's kv_cache and decode_matmul (auto: slots and rows on CPU).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"))
    parser.add_argument("--video", default=os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--step-repeats", type=int, default=20)
    return parser.parse_args()


def make_clips(video: str, folder: str) -> list:
    """The fixture video plus two clips cut from it (3 s at 480x270, 4 s at 320x240), mp4v."""
    from bench_clips import read_frames, write_clip
    frames, fps = read_frames(video)
    return [video] + [write_clip(os.path.join(folder, f"clip_{seconds}s_{size[0]}x{size[1]}.mp4"),
                                 frames[: int(seconds * fps)], fps, size)
                      for seconds, size in ((3, (480, 270)), (4, (320, 240)))]


def requests_mix(videos: list, count: int, new_tokens: int) -> list:
    questions = ["Describe this video in detail.", "What is the animal doing?", "Where does this take place?",
                 "Write a short poem about spring.", "What is the capital of France?", "Explain rain."]
    mix = []
    for i in range(count):
        request = {"text": questions[i % len(questions)], "max_new_tokens": new_tokens,
                   "stop_token_ids": []}                # random weights: always generate new_tokens
        if i % 2 == 0:
            request["video"] = videos[(i // 2) % len(videos)]
        mix.append(request)
    return mix


def run(engine, requests) -> dict:
    start = time.perf_counter()
    handles = [engine.submit(**r) for r in requests]
    outputs = [h.result() for h in handles]
    seconds = time.perf_counter() - start
    tokens = sum(len(o.new_tokens) for o in outputs)
    ttft = sorted(o.time_to_first_token for o in outputs)
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "requests_per_min": 60 * len(outputs) / seconds,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95))}


def step_runners(model, batch: int, context: int, slots: int) -> dict:
    """{kind: () -> logits (batch, vocab)} for one decode step of ``batch`` rows with ``context`` cached
    tokens each, every way the model can run it:
    - "slots": the engine's step on a slot cache of ``slots`` slots (kv_cache slots; rows kernel per
      decode_matmul);
    - "concat+rows": the functional cache extended by concat, the rows kernel (the previous engine);
    - "concat+onednn": the functional cache, every product on ops.MatMul (the portable path)."""
    from mindspore import Tensor, mutable
    from cogvlm2.cogvlm2_kv_cache import SlotKVCache
    from cogvlm2.cogvlm2_token_types import causal_bias
    c = model.config
    past = mutable(tuple(Tensor(np.zeros((batch, c.num_multi_query_heads, context, c.head_dim), np.float32))
                         for _ in range(2 * c.num_hidden_layers)))
    tokens, positions = np.full((batch, 1), 1000), np.full((batch, 1), context)
    step = (tokens, None, np.zeros((batch, 1), np.int64), positions,
            causal_bias(np.ones((batch, context + 1), np.int64), context), past, np.arange(batch))
    rows_graph = model.decode_step

    def concat(graph):
        def run():
            saved = model.decode_step
            object.__setattr__(model, "decode_step", graph)
            try:
                return model.run_step(*step)[0].asnumpy()
            finally:
                object.__setattr__(model, "decode_step", saved)
        return run

    runners = {}
    if model.slot_step is not None:
        cache = SlotKVCache(c, slots)
        cache_positions = np.full(batch, context)
        runners["slots"] = lambda: model.run_slot_step(tokens, positions, cache, np.arange(batch),
                                                       cache_positions).asnumpy()
    if rows_graph is not None:
        runners["concat+rows"] = concat(rows_graph)
    runners["concat+onednn"] = concat(None)
    return runners


def step_times(model, batches: tuple, context: int, repeats: int) -> dict:
    """{(kind, batch): median seconds of one decode step}, every kind and batch interleaved (in reverse
    order every other round, so no kind always follows the same one), and {"max_logit_diff": ...}
    between the kinds' logits of the same inputs."""
    runners = {batch: step_runners(model, batch, context, max(batches)) for batch in batches}
    times = {(kind, batch): [] for batch in batches for kind in runners[batch]}
    last = {}
    for i in range(repeats + 2):
        for (kind, batch) in (list(times) if i % 2 else list(times)[::-1]):
            start = time.perf_counter()
            last[(kind, batch)] = runners[batch][kind]()
            if i >= 2:
                times[(kind, batch)].append(time.perf_counter() - start)
    result = {key: statistics.median(t) for key, t in times.items()}
    result["max_logit_diff"] = max(float(np.abs(last[key] - last[(next(iter(runners[key[1]])), key[1])]).max())
                                   for key in times)
    return result


def main():
    args = parse_args()
    os.environ.setdefault("GLOG_v", "3")
    import mindspore as ms
    from cogvlm2 import CogVLM2Config, CogVLM2Engine, CogVLM2ForVideo, CogVLM2Processor
    from cogvlm2.cogvlm2_loading import fill_random_weights
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")

    model = CogVLM2ForVideo(CogVLM2Config.from_hf_config(args.config))
    fill_random_weights(model)
    processor = CogVLM2Processor().apply_model_config(model.config)
    with tempfile.TemporaryDirectory() as folder:
        videos = make_clips(args.video, folder)
        requests = requests_mix(videos, args.requests, args.new_tokens)
        results = {}
        for label, batch in (("sequential (batch 1)", 1), (f"continuous batching (batch {args.batch})", args.batch)):
            with CogVLM2Engine(model, processor, max_batch_size=batch) as engine:
                start = time.perf_counter()
                engine.warmup()
                warmup = time.perf_counter() - start
                engine.generate([dict(r, max_new_tokens=2) for r in requests[:2]])   # compile, fill the cache
                results[label] = run(engine, requests)
                stats = engine.snapshot()
                results[label]["occupancy"] = stats.decode_rows / max(stats.decode_steps, 1)
                results[label]["warmup"] = warmup
        steps = step_times(model, (1, args.batch), 450, args.step_repeats)

    print(f"{args.requests} requests ({args.requests // 2} with video: {len(videos)} videos; the rest text), "
          f"{args.new_tokens} new tokens each, submitted at once; bench config, random weights")
    print(f"{'run':38s} {'seconds':>8s} {'tokens/s':>9s} {'req/min':>8s} {'TTFT p50':>9s} {'TTFT p95':>9s} "
          f"{'batch occupancy':>16s} {'warmup (compiles)':>18s}")
    for label, r in results.items():
        print(f"{label:38s} {r['seconds']:8.1f} {r['tokens_per_s']:9.1f} {r['requests_per_min']:8.1f} "
              f"{r['ttft_p50']:8.2f}s {r['ttft_p95']:8.2f}s {r['occupancy']:16.2f} {r['warmup']:17.1f}s")
    sequential, batched = results.values()
    print(f"throughput ratio (batched / sequential): {batched['tokens_per_s'] / sequential['tokens_per_s']:.2f}x "
          "(target >= 4x)")
    print(f"decode step at 450 tokens of context, every way the model runs it, interleaved (max |logits "
          f"difference| between them {steps['max_logit_diff']:.2g}); the engine runs the first:")
    for kind in [key[0] for key in steps if isinstance(key, tuple) and key[1] == 1]:
        step1, step_b = steps[(kind, 1)], steps[(kind, args.batch)]
        print(f"  {kind:14s} batch 1 {step1 * 1e3:6.1f} ms, batch {args.batch} {step_b * 1e3:6.1f} ms, "
              f"ratio {step_b / step1:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
