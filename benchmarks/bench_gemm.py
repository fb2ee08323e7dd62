"""The AMX product (``gemm: amx``) against MindSpore's MatMul (``gemm: onednn``), side by side in one
process (a script that prints figures, not a test).

    python benchmarks/bench_gemm.py [--config benchmarks/bench_config.json] [--rounds 15] [--prefill-rounds 15]

1. One-op graphs ``x (M, K) @ w (K, N)`` on the bench tower's and decoder's shapes (3 frames = 771
   rows, the 413-token prompt) and on the real model's (vision hidden 1792 / MLP 15360, decoder 4096 /
   14336): medians of ``--rounds`` interleaved calls each, GFLOP/s, the ratio, and both results' largest
   error against float64 on 64 rows.
2. The decoder's prefill step of the bench model (the golden video's 413-token prompt, vision
   embeddings computed once): two models with the same random weights, one per choice, called in
   alternating order, medians of ``--prefill-rounds``.
Needs a CPU with AMX-BF16 (``cogvlm2_cpu_kernels.amx_available``).
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

SHAPES = {"bench tower qkv": (771, 256, 768), "bench tower fc2": (771, 1024, 256),
          "bench decoder gate": (413, 1024, 2816), "bench decoder down": (413, 2816, 1024),
          "real tower fc1": (771, 1792, 15360), "real tower fc2": (771, 15360, 1792),
          "real decoder gate": (413, 4096, 14336)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"))
    parser.add_argument("--video", default=os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--prefill-rounds", type=int, default=15)
    return parser.parse_args()


def one_op_table(rounds: int):
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops
    from cogvlm2.cogvlm2_cpu_kernels import amx_matmul_op

    class Product(nn.Cell):
        def __init__(self, weight, product):
            super().__init__()
            self.weight = Parameter(Tensor(weight), name="weight")
            self.product = product

        def construct(self, x):
            return self.product(x, self.weight)

    rng = np.random.default_rng(0)
    print(f"one-op graphs, medians of {rounds} interleaved calls; error: largest |result - float64| on 64 rows")
    print("| shape (M x K x N) | onednn | amx | amx / onednn | error onednn / amx |")
    print("|---|---|---|---|---|")
    for label, (m, k, n) in SHAPES.items():
        x = Tensor(rng.standard_normal((m, k), dtype=np.float32))
        w = rng.standard_normal((k, n), dtype=np.float32) * 0.05
        cells = {"onednn": Product(w, ops.MatMul()), "amx": Product(w, amx_matmul_op())}
        results = {name: cell(x).asnumpy() for name, cell in cells.items()}     # compiles
        times = {name: [] for name in cells}
        for r in range(rounds if k * n < 5e6 else max(3, rounds // 3)):
            for name in (list(cells) if r % 2 else list(cells)[::-1]):
                start = time.perf_counter()
                cells[name](x).asnumpy()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        exact = x.asnumpy()[:64].astype(np.float64) @ w.astype(np.float64)
        err = {name: float(np.abs(out[:64] - exact).max()) for name, out in results.items()}
        rate = {name: 2 * m * k * n / med[name] / 1e9 for name in cells}
        print(f"| {label}: {m}x{k}x{n} | {med['onednn'] * 1e3:.2f} ms, {rate['onednn']:.0f} GFLOP/s | "
              f"{med['amx'] * 1e3:.2f} ms, {rate['amx']:.0f} GFLOP/s | {med['onednn'] / med['amx']:.2f}x | "
              f"{err['onednn']:.1e} / {err['amx']:.1e} |", flush=True)


def prefill_table(config_path: str, video: str, rounds: int):
    from bench_generate import PEER_PROMPT
    from cogvlm2 import CogVLM2Config, CogVLM2ForVideo, CogVLM2Processor, CogVLM2Tokenizer
    from cogvlm2.cogvlm2_loading import fill_random_weights
    from cogvlm2.cogvlm2_token_types import causal_bias

    # the same N(0, 0.02) weights (same seed) in a model of each choice
    models = {}
    for choice in ("onednn", "amx"):
        models[choice] = CogVLM2ForVideo(CogVLM2Config.from_hf_config(config_path, gemm=choice))
        fill_random_weights(models[choice], 0)
    processor = CogVLM2Processor(CogVLM2Tokenizer(), num_frames=models["amx"].config.num_frames)
    inputs = processor(text=PEER_PROMPT, video=video)
    rows = models["amx"].vision_rows(inputs["pixel_values"], None)
    length = inputs["input_ids"].shape[1]

    def prefill(model):
        logits, _ = model.run_step(inputs["input_ids"], rows, inputs["token_type_ids"], inputs["position_ids"],
                                   causal_bias(inputs["attention_mask"], 0), model.empty_cache(1),
                                   np.array([length - 1]))
        return logits.asnumpy()

    outputs = {choice: prefill(model) for choice, model in models.items()}    # compiles
    times = {choice: [] for choice in models}
    for r in range(rounds):
        for choice in (("onednn", "amx") if r % 2 else ("amx", "onednn")):
            start = time.perf_counter()
            prefill(models[choice])
            times[choice].append(time.perf_counter() - start)
    med = {choice: statistics.median(t) * 1e3 for choice, t in times.items()}
    diff = float(np.abs(outputs["amx"] - outputs["onednn"]).max())
    print(f"\ndecoder prefill step, {length} tokens (vision embeddings given), medians of {rounds} interleaved "
          f"calls: onednn {med['onednn']:.1f} ms, amx {med['amx']:.1f} ms, {med['onednn'] / med['amx']:.2f}x; "
          f"last-position logits differ by {diff:.1e} (largest |logit| {np.abs(outputs['onednn']).max():.2f})")


def main():
    args = parse_args()
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from cogvlm2.cogvlm2_cpu_kernels import amx_available
    if not amx_available():
        print("this CPU (or its kernel) gives no AMX-BF16 tiles: nothing to compare")
        return 1
    one_op_table(args.rounds)
    prefill_table(args.config, args.video, args.prefill_rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
