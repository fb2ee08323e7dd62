"""The decoder's prefill step with each CPU kernel choice, side by side in one process (a script that
prints figures, not a test).

    python benchmarks/bench_prefill.py [--config benchmarks/bench_config.json] [--rounds 15]

The bench model's step on the golden video's prompt (vision embeddings computed once, given to every
model), in models with the same N(0, 0.02) weights:
- ``onednn``: ``gemm: onednn, decoder_kernels: ops``, MindSpore's ops alone;
- ``amx``: ``gemm: amx, decoder_kernels: ops``, the AMX product (left out where the CPU has no AMX-BF16);
- ``amx+decoder`` (``onednn+decoder`` without AMX): and the decoder's kernels (RMSNorm, SiLU * up,
  prefill attention), what ``auto`` runs on this CPU.
Each round calls every model once, in rotating order, so load from other jobs hits them alike; it prints
the medians, the ratios to ``onednn`` and each model's largest last-position logit difference from it.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"))
    parser.add_argument("--video", default=os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4"))
    parser.add_argument("--rounds", type=int, default=15)
    return parser.parse_args()


def variants(amx: bool) -> dict:
    gemm = "amx" if amx else "onednn"
    chosen = {"onednn": {"gemm": "onednn", "decoder_kernels": "ops"}}
    if amx:
        chosen["amx"] = {"gemm": "amx", "decoder_kernels": "ops"}
    chosen[f"{gemm}+decoder"] = {"gemm": gemm, "decoder_kernels": "fused"}
    return chosen


def main():
    args = parse_args()
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from bench_generate import PEER_PROMPT
    from cogvlm2 import CogVLM2Config, CogVLM2ForVideo, CogVLM2Processor, CogVLM2Tokenizer
    from cogvlm2.cogvlm2_cpu_kernels import resolve_gemm
    from cogvlm2.cogvlm2_loading import fill_random_weights
    from cogvlm2.cogvlm2_token_types import causal_bias

    models = {}
    for name, overrides in variants(resolve_gemm("auto", "CPU") == "amx").items():
        models[name] = CogVLM2ForVideo(CogVLM2Config.from_hf_config(args.config, **overrides))
        fill_random_weights(models[name], 0)                   # the same weights in each
    first = next(iter(models.values()))
    processor = CogVLM2Processor(CogVLM2Tokenizer(), num_frames=first.config.num_frames)
    inputs = processor(text=PEER_PROMPT, video=args.video)
    rows = first.vision_rows(inputs["pixel_values"], None)
    length = inputs["input_ids"].shape[1]
    bias = causal_bias(inputs["attention_mask"], 0)

    def prefill(model):
        logits, _ = model.run_step(inputs["input_ids"], rows, inputs["token_type_ids"], inputs["position_ids"],
                                   bias, model.empty_cache(1), np.array([length - 1]))
        return logits.asnumpy()

    outputs = {name: prefill(model) for name, model in models.items()}    # compiles
    names = list(models)
    times = {name: [] for name in names}
    for r in range(max(1, args.rounds)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            prefill(models[name])
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"decoder prefill step, {length} tokens (vision embeddings given), medians of {args.rounds} rotating "
          f"rounds; largest |logit| {np.abs(outputs['onednn']).max():.2f}")
    for name in names:
        diff = float(np.abs(outputs[name] - outputs["onednn"]).max())
        print(f"{name:16s} {med[name]:7.1f} ms  (rounds {min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f})"
              f"  {med['onednn'] / med[name]:.2f}x onednn  last-position logits differ by {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
