"""The vision tower with each ``vision_kernels`` choice, side by side in one process (a script that prints
figures, not a test).

    python benchmarks/bench_vision.py [--config benchmarks/bench_config.json] [--frames 6] [--rounds 15]

Two models of the config share the same N(0, 0.02) vision weights (only the tower and adapter are
filled; the decoder's parameters stay lazy and take no memory): ``vision_kernels: ops`` (MindSpore's
GELU and LayerNorm) and ``fused`` (the CPU kernels, what ``auto`` runs on CPU). Each round encodes the
golden video's frames with both, in alternating order, so load from other jobs hits both alike; it
prints the medians, the ratio and the largest difference between the two embeddings.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"))
    parser.add_argument("--video", default=os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4"))
    parser.add_argument("--frames", type=int, default=24, help="at most this many (the chat strategy: one per second)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def vision_model(config_path: str, choice: str, seed: int):
    from mindspore import Tensor
    from cogvlm2 import CogVLM2Config, CogVLM2ForVideo
    model = CogVLM2ForVideo(CogVLM2Config.from_hf_config(config_path, vision_kernels=choice))
    rng = np.random.default_rng(seed)
    for name, param in model.parameters_and_names():
        if name.startswith("model.vision."):
            param.set_data(Tensor.from_numpy(rng.standard_normal(param.shape, dtype=np.float32) * 0.02))
    return model


def main():
    args = parse_args()
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from cogvlm2 import CogVLM2Processor

    processor = CogVLM2Processor(num_frames=args.frames)
    pixels = processor.transform(processor.load_video(args.video)[0])      # (T, 3, 224, 224)
    models = {choice: vision_model(args.config, choice, args.seed) for choice in ("ops", "fused")}
    outputs = {choice: model.encode_video(pixels).asnumpy() for choice, model in models.items()}  # compiles
    times = {choice: [] for choice in models}
    for r in range(max(1, args.rounds)):
        for choice in (list(models) if r % 2 else list(models)[::-1]):
            start = time.perf_counter()
            models[choice].encode_video(pixels).asnumpy()
            times[choice].append(time.perf_counter() - start)
    med = {choice: statistics.median(t) * 1e3 for choice, t in times.items()}
    print(f"config {os.path.relpath(args.config, REPO)}, {len(pixels)} frames, medians of {args.rounds} "
          "interleaved rounds")
    for choice in models:
        print(f"vision_kernels {choice:5s}  {med[choice]:7.1f} ms  (rounds {min(times[choice]) * 1e3:.1f}-"
              f"{max(times[choice]) * 1e3:.1f})")
    diff = float(np.abs(outputs["fused"].astype(np.float64) - outputs["ops"]).max())
    print(f"fused / ops: {med['ops'] / med['fused']:.2f}x faster; largest embedding difference {diff:.1e} "
          f"(largest |value| {np.abs(outputs['ops']).max():.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
