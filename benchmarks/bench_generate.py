"""Generation benchmark on a random-weight model (a script that prints figures, not a test).

    python benchmarks/bench_generate.py [--config benchmarks/bench_config.json] [--video V]
                                        [--new-tokens 64] [--runs 3]

Prints medians of ``--runs`` runs: preprocess ms, vision encode ms, prefill ms (including vision),
decode tokens/s with the KV cache at the video prompt's context and at ~1600 tokens of context,
decode tokens/s without the cache (recomputing the whole sequence each step), compile time, peak RSS,
and the fraction of the memory-bandwidth bound the cached decode reaches.
"""
import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANDWIDTH_GBS = 29.0   # measured read bandwidth of 2 threads on the reference machine (issue #4)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"),
                        help="HF-style config.json of the model to build with random weights")
    parser.add_argument("--video", default=os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4"))
    parser.add_argument("--prompt", default="Please describe this video.")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long-context", type=int, default=1600, help="context for the second decode figure")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def random_model(config_path: str, seed: int):
    from mindspore import Tensor
    from cogvlm2 import CogVLM2Config, CogVLM2ForVideo
    model = CogVLM2ForVideo(CogVLM2Config.from_hf_config(config_path))
    rng = np.random.default_rng(seed)
    for _, param in model.parameters_and_names():
        param.set_data(Tensor(rng.standard_normal(param.shape, dtype=np.float32) * 0.02))
    return model


def long_history(processor, query: str, target: int):
    """A chat history that brings a text-only prompt to about ``target`` tokens."""
    turn = ("What is happening in the video at this moment?",
            "A large rabbit walks out of a burrow and looks around the meadow in the morning sun.")
    per_turn = len(processor.tokenizer.encode(f"Question: {turn[0]} Answer: {turn[1]}\n"))
    return [turn] * max(1, (target - 20) // per_turn)


def decode_rate(model, inputs, new_tokens: int, runs: int, pixel_values=None):
    rates = []
    for _ in range(runs):
        out = model.generate(inputs["input_ids"], pixel_values=pixel_values,
                             token_type_ids=inputs["token_type_ids"], position_ids=inputs["position_ids"],
                             max_new_tokens=new_tokens, stop_token_ids=[])
        rates.append(out.decode_tokens_per_second)
    return statistics.median(rates)


def nocache_rate(model, inputs, pixel_values, new_tokens: int) -> float:
    """Greedy decoding that re-runs the whole sequence for every new token (``use_past: False``)."""
    model.config.use_past = False
    try:
        return decode_rate(model, inputs, new_tokens, 1, pixel_values)
    finally:
        model.config.use_past = True


def decode_bytes(model) -> int:
    """Weight bytes one decode step reads: every decoder matrix and lm_head, one embedding row."""
    total = 0
    for name, param in model.parameters_and_names():
        if name.startswith("model.vision.") or name == "model.embed_tokens.weight":
            continue
        total += int(np.prod(param.shape)) * param.data.itemsize
    return total


def main():
    args = parse_args()
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from cogvlm2 import CogVLM2Processor, CogVLM2Tokenizer
    from cogvlm2.cogvlm2 import causal_bias

    model = random_model(args.config, args.seed)
    processor = CogVLM2Processor(CogVLM2Tokenizer(), num_frames=model.config.num_frames)
    runs = max(1, args.runs)

    pre = [timed(lambda: processor(text=args.prompt, video=args.video)) for _ in range(runs)]
    inputs = pre[-1][1]
    pixels = inputs["pixel_values"]
    length = inputs["input_ids"].shape[1]

    def prefill():
        rows = model._vision_rows(pixels, None)
        logits, _ = model.run_step(inputs["input_ids"], rows, inputs["token_type_ids"], inputs["position_ids"],
                                   causal_bias(inputs["attention_mask"], 0), model.empty_cache(1),
                                   np.array([length - 1]))
        return logits.asnumpy()

    first_vision, _ = timed(lambda: model.encode_video(pixels).asnumpy())
    first_prefill, _ = timed(prefill)
    vision = statistics.median(timed(lambda: model.encode_video(pixels).asnumpy())[0] for _ in range(runs))
    prefill_s = statistics.median(timed(prefill)[0] for _ in range(runs))
    compile_s = first_prefill - prefill_s + first_vision - vision

    short = decode_rate(model, inputs, args.new_tokens, runs, pixels)
    long_inputs = processor.build_inputs(args.prompt, None, long_history(processor, args.prompt, args.long_context))
    long_len = long_inputs["input_ids"].shape[1]
    long_rate = decode_rate(model, long_inputs, args.new_tokens, runs)
    nocache = nocache_rate(model, inputs, pixels, min(16, args.new_tokens))

    step_bytes = decode_bytes(model)
    achieved = step_bytes * short / 1e9
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"config                {os.path.relpath(args.config, REPO)}; {model.config.num_hidden_layers} decoder "
          f"layers, hidden {model.config.hidden_size}; {len(pixels)} frames; prompt {length} tokens")
    print(f"preprocess            {statistics.median(t for t, _ in pre) * 1e3:8.1f} ms")
    print(f"vision encode         {vision * 1e3:8.1f} ms")
    print(f"prefill (incl vision) {prefill_s * 1e3:8.1f} ms")
    print(f"decode @ {length:4d} ctx     {short:8.1f} tokens/s ({args.new_tokens} new tokens)")
    print(f"decode @ {long_len:4d} ctx     {long_rate:8.1f} tokens/s (step time x{short / long_rate:.2f} "
          f"of the {length}-token one)")
    print(f"decode, no KV cache   {nocache:8.1f} tokens/s (recompute; cache speed-up x{short / nocache:.1f})")
    print(f"compile (first call)  {compile_s:8.2f} s")
    print(f"peak RSS              {rss_mb:8.0f} MB")
    print(f"bandwidth             {step_bytes / 1e6:.0f} MB of weights per step -> {achieved:.1f} GB/s, "
          f"{achieved / BANDWIDTH_GBS:.0%} of the {BANDWIDTH_GBS:.0f} GB/s bound "
          f"({BANDWIDTH_GBS * 1e9 / step_bytes:.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
