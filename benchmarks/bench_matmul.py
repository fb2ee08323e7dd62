"""Decode mat-mul formulations on this machine's MindSpore CPU kernels (a script that prints figures,
not a test).

    python benchmarks/bench_matmul.py [--config benchmarks/bench_config.json] [--batches 1,2,3,4,8]
                                      [--rounds 7]

For every distinct weight shape one decode step multiplies (the decoder's qkv, dense, gate/up, down
and lm_head of the config), it times ``rows x weight`` for each batch size and three ways of writing
it, each a one-op graph with a dynamic row count (like the step graph):

- ``x @ W``        weight stored (in, out), ``MatMul`` (what ``Linear`` does);
- ``x @ W^T``      weight stored (out, in) = the PyTorch layout, ``MatMul(transpose_b=True)``;
- ``(W @ x^T)^T``  weight stored (out, in), the big matrix as the left operand;
- ``rows kernel``  weight stored (in, out), the decode step's Custom op (``cogvlm2_cpu_kernels.rows_matmul_op``).

Rounds interleave every formulation and batch size, so load from other jobs hits them alike; the
table shows medians and each formulation's time at the largest batch over its batch-1 time (a
memory-bound product reads the weight once whatever the row count, so the ideal is 1.0).
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
    parser.add_argument("--batches", default="1,2,3,4,8", help="row counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    return parser.parse_args()


def decode_shapes(config) -> dict:
    """{label: (in, out)} of the matrices one decode step multiplies."""
    h, kv = config.hidden_size, config.kv_size
    return {"qkv": (h, h + 2 * kv), "dense": (h, h), "gate/up": (h, config.intermediate_size),
            "down": (config.intermediate_size, h), "lm_head": (h, config.vocab_size)}


def formulations(weight: np.ndarray) -> dict:
    """{name: one-op Cell} computing x (N, in) -> (N, out) with ``weight`` (in, out)."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops

    from cogvlm2.cogvlm2_cpu_kernels import rows_matmul_op

    class Product(nn.Cell):
        def __init__(self, stored, left_weight, transpose_b, matmul=None):
            super().__init__()
            self.weight = Parameter(Tensor(np.ascontiguousarray(stored)), name="weight")
            self.left_weight = left_weight
            self.matmul = matmul if matmul is not None else ops.MatMul(transpose_b=transpose_b)

        def construct(self, x):
            if self.left_weight:
                return self.matmul(self.weight, x).T        # (out, in) @ (N, in)^T -> (out, N) -> (N, out)
            return self.matmul(x, self.weight)                # (N, in) @ W -> (N, out)

    cells = {"x @ W (in,out)": Product(weight, False, False),
             "x @ W^T (out,in)": Product(weight.T, False, True),
             "(W @ x^T)^T (out,in)": Product(weight.T, True, True),
             "rows kernel (in,out)": Product(weight, False, False, rows_matmul_op())}
    for cell in cells.values():
        cell.set_inputs(Tensor(shape=[None, weight.shape[0]], dtype=ms.float32))
    return cells


def main():
    args = parse_args()
    os.environ.setdefault("GLOG_v", "3")
    import mindspore as ms
    from mindspore import Tensor
    from cogvlm2 import CogVLM2Config
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    config = CogVLM2Config.from_hf_config(args.config)
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    print(f"config {os.path.relpath(args.config, REPO)}; medians of {args.rounds} interleaved rounds; "
          f"ratio = time at {batches[-1]} rows / time at {batches[0]}")
    print(f"| {'matrix':30s} | {'formulation':22s} | " + " | ".join(f"{b} rows".rjust(9) for b in batches)
          + " | ratio |")
    print("|" + "|".join("-" * w for w in [32, 24] + [11] * len(batches) + [7]) + "|")
    for label, (n_in, n_out) in decode_shapes(config).items():
        weight = (rng.standard_normal((n_in, n_out), dtype=np.float32) * 0.02)
        cells = formulations(weight)
        xs = {b: Tensor(rng.standard_normal((b, n_in), dtype=np.float32)) for b in batches}
        reference = xs[batches[-1]].asnumpy() @ weight
        for name, cell in cells.items():                  # compile, and check the formulation's numbers
            got = cell(xs[batches[-1]]).asnumpy()
            if not np.allclose(got, reference, rtol=1e-4, atol=1e-4):
                raise SystemExit(f"{name} on {label}: max |diff| {np.abs(got - reference).max():.3g}")
        repeats = max(1, int(2e7 // weight.size))         # small matrices: several calls per sample
        times = {(name, b): [] for name in cells for b in batches}
        for _ in range(args.rounds):
            for b in batches:
                for name, cell in cells.items():
                    start = time.perf_counter()
                    for _ in range(repeats):
                        out = cell(xs[b])
                    out.asnumpy()
                    times[(name, b)].append((time.perf_counter() - start) / repeats)
        size = f"{label} {n_in}x{n_out} ({weight.nbytes / 1e6:.0f} MB)"
        for name in cells:
            med = [statistics.median(times[(name, b)]) * 1e3 for b in batches]
            print(f"| {size:30s} | {name:22s} | " + " | ".join(f"{m:6.2f} ms" for m in med)
                  + f" | {med[-1] / med[0]:5.2f} |", flush=True)
            size = ""
        del cells, weight


if __name__ == "__main__":
    main()
