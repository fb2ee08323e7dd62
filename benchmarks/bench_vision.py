"""The vision tower with each CPU kernel choice, side by side in one process (a script that prints
figures, not a test).

    python benchmarks/bench_vision.py [--config benchmarks/bench_config.json] [--frames 6] [--rounds 15]
                                      [--bfloat16]

Models of the config share the same N(0, 0.02) vision weights (only the tower and adapter are filled;
the decoder's parameters stay lazy and take no memory):
- ``ops``: ``vision_kernels: ops, gemm: onednn``, MindSpore's ops alone;
- ``fused``: ``vision_kernels: fused, gemm: onednn``, the GELU, LayerNorm, attention and SiLU * up kernels;
- ``fused+amx``: ``vision_kernels: fused, gemm: amx``, and the AMX product (what ``auto`` runs on a CPU
  with AMX-BF16; left out where the CPU has none), which adds the biased Linears' bias as it stores, and
  does fc1's GELU and each branch's LayerNorm and residual add in the same kernel, and runs the two
  convolutions as products of their patches;
- ``amx+apart``: the same with that GELU, LayerNorm and add and the adapter's silu(gate) * up as their own
  kernels and the convolutions as MindSpore's Conv2D (the ``linear_gelu``, ``linear_norm_add``, ``gated``,
  patch and convolution ``linear`` kernels taken off before the first call compiles the graph);
- ``amx+BiasAdd``: the same again with each biased Linear's product and MindSpore's BiasAdd apart (the
  ``biased`` kernel taken off too);
- with ``--bfloat16`` every model's weights are rounded to bfloat16 values (as a bf16 checkpoint gives
  them), and ``amx+bf16`` (``param_init_type: bfloat16``) keeps its Linear weights as bfloat16 bits, which the
  AMX products read with 3 tile products per term instead of 6: its embeddings should equal ``fused+amx``'s.
Each round encodes the golden video's frames with every model, in rotating order, so load from other
jobs hits them alike; it prints the medians, the ratios to ``ops`` and each model's largest difference
from the ``ops`` embeddings.
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
    parser.add_argument("--bfloat16", action="store_true",
                        help="weights rounded to bfloat16 values, and the amx+bf16 model that keeps them so")
    return parser.parse_args()


VARIANTS = {"ops": {"vision_kernels": "ops", "gemm": "onednn"},
            "fused": {"vision_kernels": "fused", "gemm": "onednn"},
            "fused+amx": {"vision_kernels": "fused", "gemm": "amx"},
            "amx+apart": {"vision_kernels": "fused", "gemm": "amx"},
            "amx+BiasAdd": {"vision_kernels": "fused", "gemm": "amx"}}
APART = {"amx+apart": ("epilogues", "conv"), "amx+BiasAdd": ("epilogues", "conv", "bias")}   # what each takes off
BF16 = {"amx+bf16": {"vision_kernels": "fused", "gemm": "amx", "param_init_type": "bfloat16"}}


def vision_model(config_path: str, overrides: dict, seed: int, apart=(), bfloat16: bool = False):
    """``apart``: "epilogues" (fc1's GELU, each branch's LayerNorm and add, the adapter's silu(gate) * up as
    their own kernels), "conv"
    (the convolutions as MindSpore's Conv2D), "bias" (each biased Linear's product and BiasAdd apart).
    ``bfloat16``: the weights rounded to bfloat16 values."""
    from cogvlm2 import CogVLM2Config, CogVLM2ForVideo
    from cogvlm2.cogvlm2_weights import bfloat16_values, parameter_tensor
    from cogvlm2.cogvlm2_layers import Linear
    from cogvlm2.cogvlm2_vision import GLU, MLP, Conv2d, PatchEmbedding, TransformerLayer
    model = CogVLM2ForVideo(CogVLM2Config.from_hf_config(config_path, **overrides))
    taken_off = [("bias", Linear, "biased"), ("epilogues", MLP, "linear_gelu"),
                 ("epilogues", TransformerLayer, "linear_norm_add"), ("epilogues", GLU, "gated"),
                 ("conv", PatchEmbedding, "patchify"), ("conv", Conv2d, "linear")]   # (choice, cell, kernel)
    for _, cell in model.cells_and_names():
        for choice, kind, kernel in taken_off:
            if choice in apart and isinstance(cell, kind):
                setattr(cell, kernel, None)
    rng = np.random.default_rng(seed)
    for name, param in model.parameters_and_names():
        if name.startswith("model.vision."):
            values = rng.standard_normal(param.shape, dtype=np.float32) * np.float32(0.02)
            if bfloat16:
                values = bfloat16_values(values)
            param.set_data(parameter_tensor(param, values, "bench_vision"))
    return model


def main():
    args = parse_args()
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from cogvlm2 import CogVLM2Processor
    from cogvlm2.cogvlm2_cpu_kernels import resolve_gemm

    processor = CogVLM2Processor(num_frames=args.frames)
    pixels = processor.transform(processor.load_video(args.video)[0])      # (T, 3, 224, 224)
    variants = dict(VARIANTS, **(BF16 if args.bfloat16 else {}))
    names = [name for name in variants if resolve_gemm("auto", "CPU") == "amx" or variants[name]["gemm"] != "amx"]
    models = {name: vision_model(args.config, variants[name], args.seed, APART.get(name, ()), args.bfloat16)
              for name in names}
    outputs = {name: model.encode_video(pixels).asnumpy() for name, model in models.items()}  # compiles
    times = {name: [] for name in models}
    for r in range(max(1, args.rounds)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            models[name].encode_video(pixels).asnumpy()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"config {os.path.relpath(args.config, REPO)}, {len(pixels)} frames, medians of {args.rounds} "
          f"rotating rounds; largest |value| of the ops embeddings {np.abs(outputs['ops']).max():.3f}"
          + ("; weights rounded to bfloat16 values" if args.bfloat16 else ""))
    for name in names:
        diff = float(np.abs(outputs[name].astype(np.float64) - outputs["ops"]).max())
        print(f"{name:11s} {med[name]:7.1f} ms  (rounds {min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f})"
              f"  {med['ops'] / med[name]:.2f}x ops  largest difference from ops {diff:.1e}")
    if "amx+bf16" in outputs and "fused+amx" in outputs:
        same = np.array_equal(outputs["amx+bf16"], outputs["fused+amx"])
        print(f"amx+bf16 against fused+amx: {med['fused+amx'] / med['amx+bf16']:.2f}x, "
              + ("the same embeddings, bit for bit" if same else "DIFFERENT embeddings"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
