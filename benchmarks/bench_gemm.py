"""The AMX product (``gemm: amx``) against MindSpore's MatMul (``gemm: onednn``), side by side in one
process (a script that prints figures, not a test).

    python benchmarks/bench_gemm.py [--rounds 15]

One-op graphs ``x (M, K) @ w (K, N)`` on the bench tower's and decoder's shapes (6 frames = 1542 rows,
the 413-token prompt) and on the real model's (vision hidden 1792 / MLP 15360, decoder 4096 / 14336):
medians of ``--rounds`` interleaved calls each, GFLOP/s, the ratio, and both results' largest error
against float64 on 64 rows. The whole prefill step with each choice: ``bench_prefill.py``.
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

SHAPES = {"bench tower qkv": (1542, 256, 768), "bench tower fc2": (1542, 1024, 256),
          "bench decoder gate": (413, 1024, 2816), "bench decoder down": (413, 2816, 1024),
          "real tower fc1": (1542, 1792, 15360), "real tower fc2": (1542, 15360, 1792),
          "real decoder gate": (413, 4096, 14336)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
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


def main():
    args = parse_args()
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from cogvlm2.cogvlm2_cpu_kernels import amx_available
    if not amx_available():
        print("this CPU (or its kernel) gives no AMX-BF16 tiles: nothing to compare")
        return 1
    one_op_table(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
