"""Converter memory and time on a synthetic HF checkpoint (a script that prints figures, not a test).

    python benchmarks/bench_convert.py [--config benchmarks/bench_config.json] [--shards 4] [--runs 3]

Writes a random bf16 HF-format checkpoint of the config (PyTorch layout, ``--shards`` shards) into a
temporary directory, then runs ``tools/convert_weight.py`` on it in a child process ``--runs`` times
and prints the median time and the child's peak RSS next to the largest shard, the whole checkpoint
and the RSS of a child that only imports the converter.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(REPO, "tools", "convert_weight.py")


def write_checkpoint(config_path: str, directory: str, shards: int, seed: int) -> list:
    """Random bf16 HF checkpoint (config.json, index, shards) of the config; returns shard sizes."""
    import mindspore as ms
    from mindspore import Tensor
    from cogvlm2 import CogVLM2Config
    from cogvlm2.cogvlm2_convert import expected_shapes
    from cogvlm2.cogvlm2_weights import HF_INDEX

    config = CogVLM2Config.from_hf_config(config_path)
    shapes = expected_shapes(config)
    total = sum(int(np.prod(s)) for s in shapes.values())
    rng = np.random.default_rng(seed)
    groups, size = [[]], 0
    for name, shape in shapes.items():                       # fill shards up to total / shards params
        if size >= total / shards and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += int(np.prod(shape))
    weight_map = {}
    for number, group in enumerate(groups, 1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = [{"name": n, "data": Tensor(rng.standard_normal(s, dtype=np.float32) * 0.02).astype(ms.bfloat16)}
                   for n, s in group]
        ms.save_checkpoint(tensors, os.path.join(directory, file_name), format="safetensors")
        weight_map.update({n: file_name for n, _ in group})
    with open(os.path.join(directory, HF_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(config_path, encoding="utf-8") as f:
        hf = json.load(f)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f)
    return [os.path.getsize(os.path.join(directory, f"model-{i:05d}-of-{len(groups):05d}.safetensors"))
            for i in range(1, len(groups) + 1)]


def child_peak_rss_mb(command) -> tuple:
    """Run ``command``; return (seconds, its peak RSS in MB). Each call uses a fresh helper process
    so RUSAGE_CHILDREN holds only that command's peak."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True)
    seconds, kb = out.stdout.split()
    return float(seconds), int(kb) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args()
    env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"))
    os.environ.update(env)

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        source = os.path.join(tmp, "hf")
        os.makedirs(source)
        sizes = write_checkpoint(args.config, source, args.shards, seed=0)
        baseline = child_peak_rss_mb([sys.executable, "-c", "import mindspore, cogvlm2.cogvlm2_weights, tqdm"])[1]
        times, peaks = [], []
        for run in range(args.runs):
            out = os.path.join(tmp, f"out{run}")
            seconds, peak = child_peak_rss_mb([sys.executable, CONVERTER, "--model", "cogvlm2", "--input_path",
                                               source, "--output_path", out, "--dtype", args.dtype])
            times.append(seconds)
            peaks.append(peak)
    mb = 1024 * 1024
    print(f"checkpoint            {sum(sizes) / mb:8.0f} MB bf16 in {len(sizes)} shards, largest {max(sizes) / mb:.0f} MB")
    print(f"convert to {args.dtype:5s}      {statistics.median(times):8.1f} s  (median of {args.runs})")
    print(f"peak RSS              {statistics.median(peaks):8.0f} MB  (import only: {baseline:.0f} MB; "
          f"above it: {statistics.median(peaks) - baseline:.0f} MB = "
          f"{(statistics.median(peaks) - baseline) / (max(sizes) / mb):.2f} x the largest shard)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
