"""Generation benchmark on a random-weight model (a script that prints figures, not a test).

    python benchmarks/bench_generate.py [--config benchmarks/bench_config.json] [--video V]
                                        [--new-tokens 32] [--runs 3] [--peer] [--param-init-type bfloat16]

Prints medians of ``--runs`` rounds (and each round's vision encode, both sides): preprocess ms, vision
encode ms, prefill ms (including vision; each the second of two calls in a row, as the peer's script
times them: a first call after the process sat idle, e.g. while the peer ran, takes up to 2x on this VM
with either implementation), decode tokens/s with the KV cache at the video prompt's context, the
memory-bandwidth bound of that decode (read bandwidth measured in the same round), the vision tower's
FLOP rate against the machine's float32 GEMM rate (measured in the same round: numpy's OpenBLAS, and
the peer venv's MKL), compile time, peak RSS against the weight bytes; then, once, decode at ~1600
tokens of context and without the cache.

With ``--peer`` and the official PyTorch implementation present at ``REPO/../shared/peer`` (same bench
config, same video, same machine), every round runs our figures and then the peer's
``bench_generate_peer.py`` as a subprocess, so load drift from other jobs cancels in the ratios; the
table shows both columns and the ratio. Without that directory only our column is printed.

``--param-init-type bfloat16``: our model keeps its Linear weights and token embedding in bfloat16, as a
bf16 checkpoint (the real model's) gives them: the random values are rounded to bfloat16, and every product
widens them exactly, so the outputs are those of float32 weights with the same values (tests/test_bf16_weights.py).
The peer always runs float32 weights, which is how the official code computes in float32 on CPU.

Both sides' figures start ``--settle`` seconds (1.5) after the last child process exited: ours after the
previous round's peer, the peer's after this round's bandwidth and GEMM probes; our figures come before the
probes. On this VM a process that has just freed GBs leaves the machine slower for about a second
(measured: our vision encode 97-134 ms for 3-4 encodes after a child allocated and freed 1.3 GB, against
65 ms; 64-65 ms after a 1.5 s pause, past the first call). Ours used to start 0.25 s after the peer's exit.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_DIR = os.path.join(os.path.dirname(REPO), "shared", "peer")
PEER_PROMPT = "Describe this video in detail."   # the prompt bench_generate_peer.py uses


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"),
                        help="HF-style config.json of the model to build with random weights")
    parser.add_argument("--video", default=os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4"))
    parser.add_argument("--prompt", default=PEER_PROMPT, help="default: the peer benchmark's prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--long-context", type=int, default=1600, help="context for the long decode figure")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bandwidth-bytes", type=int, help=argparse.SUPPRESS)   # child: print GB/s, exit
    parser.add_argument("--peer", action="store_true",
                        help=f"interleave runs of the official implementation ({PEER_DIR}) and print ratios")
    parser.add_argument("--param-init-type", default="float32", choices=["float32", "bfloat16"],
                        help="our parameters' model_config param_init_type (bfloat16: Linear weights and "
                             "token embedding kept as bfloat16, the random values rounded to it)")
    parser.add_argument("--settle", type=float, default=1.5,
                        help="seconds each round waits before our figures, after the previous round's child "
                             "processes exited (0: none)")
    return parser.parse_args()


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_again(fn) -> float:
    """Seconds of the second of two calls in a row (bench_generate_peer.py's protocol)."""
    fn()
    return timed(fn)[0]


def rss_mb() -> float:
    """Resident memory in MB (10^6 bytes, the unit of the weight figures it is divided by)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6      # kB (KiB) -> MB
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def read_bandwidth_gbs(nbytes: int, threads: int = 2, repeats: int = 5) -> float:
    """Best read bandwidth of ``threads`` numpy threads summing (column-wise) an array of ``nbytes``:
    the rate a decode step that reads ``nbytes`` of weights cannot beat on this machine right now."""
    data = np.ones((max(nbytes // 4096, threads), 1024), np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(part,)) for part in parts]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def measure_bandwidth(nbytes: int) -> float:
    """``read_bandwidth_gbs`` in a child process, so its array does not count in our peak RSS."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--bandwidth-bytes", str(nbytes)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


SGEMM_CODE = """
import time
n = 2048
try:
    import torch                      # the peer's venv: PyTorch's MKL sgemm
    torch.set_num_threads(2)
    a, b = torch.ones(n, n), torch.ones(n, n)
    mm = torch.mm
except ImportError:
    import numpy                      # ours: numpy's OpenBLAS sgemm
    a, b = numpy.ones((n, n), numpy.float32), numpy.ones((n, n), numpy.float32)
    mm = numpy.matmul
best = float("inf")
for _ in range(5):
    start = time.perf_counter()
    mm(a, b)
    best = min(best, time.perf_counter() - start)
print(2 * n ** 3 / best / 1e9)
"""


def sgemm_gflops(python: str) -> float:
    """Best float32 2048^3 GEMM rate of ``python``'s BLAS (MKL via PyTorch in the peer's venv, numpy's
    OpenBLAS in ours) on 2 threads, in a child process: the FLOP rate this machine gives right now."""
    out = subprocess.run([python, "-c", SGEMM_CODE], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2", MKL_NUM_THREADS="2"))
    return float(out.stdout.strip().splitlines()[-1])


def vision_flops(config, frames: int) -> float:
    """FLOPs (2 per multiply-add) of the vision tower and adapter for ``frames`` frames: patch conv,
    per layer qkv + scores + weighted sum + dense + MLP, the 2x2 conv, the GLU (linear_proj + 3 SwiGLU)."""
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    tokens, c = patches + 1, v.hidden_size
    layer = 2 * tokens * c * (3 * c + c + 2 * v.intermediate_size) + 2 * 2 * tokens * tokens * c
    merged = patches // config.adapter_conv_size ** 2
    adapter = (2 * merged * c * config.adapter_conv_size ** 2 * c + 2 * merged * c * config.hidden_size
               + 3 * 2 * merged * config.hidden_size * config.intermediate_size)
    patch = 2 * patches * v.in_channels * v.patch_size ** 2 * c
    return frames * (patch + v.num_hidden_layers * layer + adapter)


def random_model(config_path: str, seed: int, param_init_type: str = "float32"):
    """The model with N(0, 0.02) weights, filled in place one parameter at a time (no extra copies:
    peak RSS stays near the weight bytes); bfloat16 weights get the values rounded to bfloat16."""
    from cogvlm2 import CogVLM2Config, CogVLM2ForVideo
    from cogvlm2.cogvlm2_loading import fill_random_weights
    model = CogVLM2ForVideo(CogVLM2Config.from_hf_config(config_path, param_init_type=param_init_type))
    fill_random_weights(model, seed)
    return model


def long_history(processor, target: int):
    """A chat history that brings a text-only prompt to about ``target`` tokens."""
    turn = ("What is happening in the video at this moment?",
            "A large rabbit walks out of a burrow and looks around the meadow in the morning sun.")
    per_turn = len(processor.tokenizer.encode(f"Question: {turn[0]} Answer: {turn[1]}\n"))
    return [turn] * max(1, (target - 20) // per_turn)


def decode_rate(model, inputs, new_tokens: int, pixel_values=None) -> float:
    from cogvlm2 import generate
    out = generate(model, inputs["input_ids"], pixel_values=pixel_values,
                   token_type_ids=inputs["token_type_ids"], position_ids=inputs["position_ids"],
                   max_new_tokens=new_tokens, stop_token_ids=[])
    return out.decode_tokens_per_second


def nocache_rate(model, inputs, pixel_values, new_tokens: int) -> float:
    """Greedy decoding that re-runs the whole sequence for every new token (``use_past: False``)."""
    model.config.use_past = False
    try:
        return decode_rate(model, inputs, new_tokens, pixel_values)
    finally:
        model.config.use_past = True


def decode_bytes(model, float32: bool = False) -> int:
    """Weight bytes one decode step reads: every decoder matrix and lm_head, one embedding row (``float32``:
    were they all float32, as the peer's are)."""
    total = 0
    for name, param in model.parameters_and_names():
        if name.startswith("model.vision.") or name == "model.embed_tokens.weight":
            continue
        total += int(np.prod(param.shape)) * (4 if float32 else param.data.itemsize)
    return total


def weight_bytes(model) -> int:
    """The bytes the parameters are kept in (2 per value of a Linear weight kept in bfloat16)."""
    return sum(int(np.prod(p.shape)) * p.data.itemsize for _, p in model.parameters_and_names())


def float32_bytes(model) -> int:
    return sum(int(np.prod(p.shape)) * 4 for _, p in model.parameters_and_names())


def peer_python():
    """The peer venv's python (``setup.sh`` prints it; it builds the venv on first use), or None."""
    if not os.path.isfile(os.path.join(PEER_DIR, "bench_generate_peer.py")):
        return None
    out = subprocess.run(["bash", os.path.join(PEER_DIR, "setup.sh")], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def run_peer(python: str, video: str, new_tokens: int) -> dict:
    """One run of the official implementation's benchmark: its JSON line as a dict."""
    out = subprocess.run([python, "bench_generate_peer.py", video, str(new_tokens)], cwd=PEER_DIR,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table_row(label: str, ours: float, peer, unit: str, fmt: str, higher_is_better: bool):
    ours_s = f"{ours:{fmt}} {unit}"
    if peer is None:
        return f"| {label:28s} | {ours_s:>14s} |"
    ratio = ours / peer if higher_is_better else peer / ours
    return f"| {label:28s} | {ours_s:>14s} | {peer:{fmt}} {unit:>8s} | {ratio:5.2f}x |"


def main():
    args = parse_args()
    if args.bandwidth_bytes:
        print(read_bandwidth_gbs(args.bandwidth_bytes))
        return 0
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from cogvlm2 import CogVLM2Processor, CogVLM2Tokenizer
    from cogvlm2.cogvlm2_token_types import causal_bias

    python = peer_python() if args.peer else None
    if args.peer and python is None:
        print(f"(no peer at {PEER_DIR}: our column only)")
    base_rss = rss_mb()                                  # the interpreter with mindspore and mindformers
    model = random_model(args.config, args.seed, args.param_init_type)
    processor = CogVLM2Processor(CogVLM2Tokenizer(), num_frames=model.config.num_frames)
    loaded_peak = peak_rss_mb()
    runs = max(1, args.runs)

    inputs = processor(text=args.prompt, video=args.video)
    pixels = inputs["pixel_values"]
    length = inputs["input_ids"].shape[1]
    step_bytes = decode_bytes(model)

    def prefill():
        rows = model.vision_rows(pixels, None)
        logits, _ = model.run_step(inputs["input_ids"], rows, inputs["token_type_ids"], inputs["position_ids"],
                                   causal_bias(inputs["attention_mask"], 0), model.empty_cache(1),
                                   np.array([length - 1]))
        return logits.asnumpy()

    first_vision, _ = timed(lambda: model.encode_video(pixels).asnumpy())
    first_prefill, _ = timed(prefill)
    first_decode, _ = timed(lambda: decode_rate(model, inputs, 2, pixels))   # compiles the decode graph
    again_decode, _ = timed(lambda: decode_rate(model, inputs, 2, pixels))

    ours = {k: [] for k in ("preprocess", "vision", "prefill", "decode", "bandwidth", "sgemm", "peer_sgemm")}
    peers = []
    for _ in range(runs):
        time.sleep(args.settle)      # the last round's children freed GBs: see the module docstring
        ours["preprocess"].append(timed(lambda: processor(text=args.prompt, video=args.video))[0])
        ours["vision"].append(timed_again(lambda: model.encode_video(pixels).asnumpy()))
        ours["prefill"].append(timed_again(prefill))
        ours["decode"].append(decode_rate(model, inputs, args.new_tokens, pixels))
        ours["bandwidth"].append(measure_bandwidth(step_bytes))
        ours["sgemm"].append(sgemm_gflops(sys.executable))
        if python:
            ours["peer_sgemm"].append(sgemm_gflops(python))
            time.sleep(args.settle)  # the same pause before the peer's figures, after our probes exited
            peers.append(run_peer(python, args.video, args.new_tokens))
    med = {k: statistics.median(v) for k, v in ours.items() if v}
    compile_s = first_prefill - med["prefill"] + first_vision - med["vision"]
    compile_decode = first_decode - again_decode
    generated_peak = peak_rss_mb()

    long_inputs = processor.build_inputs(args.prompt, None, long_history(processor, args.long_context))
    long_len = long_inputs["input_ids"].shape[1]
    long_rate = decode_rate(model, long_inputs, args.new_tokens)
    nocache = nocache_rate(model, inputs, pixels, min(16, args.new_tokens))

    wbytes, f32bytes = weight_bytes(model) / 1e6, float32_bytes(model) / 1e6
    bound = med["bandwidth"] * 1e9 / step_bytes          # tokens/s if a step only read its weights
    peer_bound = med["bandwidth"] * 1e9 / decode_bytes(model, float32=True)
    peer_med = ({k: statistics.median(p[key] for p in peers) for k, key in
                 (("preprocess", "preprocess_s"), ("vision", "vision_s"), ("prefill", "prefill_incl_vision_s"),
                  ("decode", "decode_tok_per_s"))} if peers else {})
    print(f"config {os.path.relpath(args.config, REPO)}: {model.config.num_hidden_layers} decoder layers, hidden "
          f"{model.config.hidden_size}, {wbytes:.0f} MB of weights ("
          + ("float32" if wbytes == f32bytes else
             f"param_init_type {args.param_init_type}: Linear weights and token embedding in bfloat16, "
             f"{f32bytes:.0f} MB in float32")
          + f"); {len(pixels)} frames; prompt "
          f"{length} tokens" + (f" (peer {peers[0]['prompt_tokens']})" if peers else "")
          + f"; medians of {runs} rounds" + (", ours and the peer's interleaved" if peers else ""))
    header = "| stage                        | ours           |" + (" official        | ratio  |" if peers else "")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    rows = [("preprocess (frames + tokens)", med["preprocess"] * 1e3, peer_med.get("preprocess"), "ms", ".0f", False),
            (f"vision encode, {len(pixels)} frames", med["vision"] * 1e3, peer_med.get("vision"), "ms", ".0f", False),
            ("prefill incl. vision", med["prefill"] * 1e3, peer_med.get("prefill"), "ms", ".0f", False),
            (f"decode @ {length} tokens", med["decode"], peer_med.get("decode"), "tok/s", ".1f", True)]
    for label, value, peer, unit, fmt, higher in rows:
        if peer is not None and unit == "ms":
            peer *= 1e3
        print(table_row(label, value, peer, unit, fmt, higher))
    vision_rounds = ", ".join(f"{v * 1e3:.0f}" for v in ours["vision"])
    if peers:          # the spread: this VM has hours where some rounds of either side take up to 2x
        best = min(p["vision_s"] for p in peers) / min(ours["vision"])
        vision_rounds += ("; peer " + ", ".join(f"{p['vision_s'] * 1e3:.0f}" for p in peers)
                          + f"; best round of each {best:.2f}x")
    print(f"vision rounds (ms)            ours {vision_rounds}")
    print(f"read bandwidth (2 threads)    {med['bandwidth']:.1f} GB/s (measured each round; rounds: "
          + ", ".join(f"{b:.1f}" for b in ours["bandwidth"]) + ")")
    print(f"decode vs bandwidth bound     {med['decode'] / bound:.0%} of {bound:.1f} tokens/s "
          f"({step_bytes / 1e6:.0f} MB of weights per step)"
          + (f"; peer {peer_med['decode'] / peer_bound:.0%}" + ("" if peer_bound == bound else
             f" of {peer_bound:.1f} (its float32 weights)") if peers else ""))
    flops = vision_flops(model.config, len(pixels))
    sgemm = max(med["sgemm"], med.get("peer_sgemm", 0.0))
    print(f"vision FLOP rate              {flops / 1e9:.1f} GFLOP: ours {flops / med['vision'] / 1e9:.0f} GFLOP/s = "
          f"{flops / med['vision'] / 1e9 / sgemm:.0%} of the machine's 2048^3 sgemm rate ({sgemm:.0f} GFLOP/s: "
          f"numpy/OpenBLAS {med['sgemm']:.0f}" + (f", MKL {med['peer_sgemm']:.0f}" if "peer_sgemm" in med else "")
          + ")" + (f"; peer {flops / peer_med['vision'] / 1e9:.0f} GFLOP/s = "
                   f"{flops / peer_med['vision'] / 1e9 / sgemm:.0%}" if peers else ""))
    print(f"decode @ {long_len} tokens        {long_rate:.1f} tokens/s (step time x{med['decode'] / long_rate:.2f} "
          f"of the {length}-token one)")
    print(f"decode, no KV cache           {nocache:.1f} tokens/s (recompute; cache speed-up "
          f"x{med['decode'] / nocache:.1f})")
    print(f"compile (first calls)         {compile_s:.2f} s (vision graph + step graph), {compile_decode:.2f} s "
          "(the single-sequence decode graph)")
    print(f"peak RSS                      {generated_peak:.0f} MB = {generated_peak / wbytes:.2f}x the weights "
          f"(after loading {loaded_peak:.0f} MB; interpreter with mindspore/mindformers alone {base_rss:.0f} MB: "
          f"{(generated_peak - base_rss) / wbytes:.2f}x above it)"
          + ("" if wbytes == f32bytes else
             f"; {generated_peak / f32bytes:.2f}x the float32 weights' {f32bytes:.0f} MB"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
