"""Fine-tuning step benchmark on a random-weight model (prints figures; not a test).

    python benchmarks/bench_finetune.py [--config benchmarks/bench_config.json] [--video V] [--steps 3] [--peer]

The batch of the peer's script (/work/shared/peer/bench_finetune_peer.py): 4 samples, 2 with the video
(chat template) and 2 text-only, short responses; one global batch per step (one padded micro-batch),
token-weighted loss, AdamW. LoRA: r 8, alpha 32 on language_expert_query_key_value and
language_expert_dense, vision frozen. Full: every parameter. Medians over --steps after one warm-up
step. With --peer the official implementation + peft runs the same batch (its venv, 2 threads) and
the ratio is printed.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PEER_PYTHON = "/tmp/cogvlm2-peer-venv/bin/python"
PEER_SCRIPT = "/work/shared/peer/bench_finetune_peer.py"
SAMPLES = [("Please describe this video.", "A big rabbit walks out of his burrow in the morning sun.", True),
           ("Tell me a short joke.", "Why did the scarecrow win an award? He was outstanding in his field.", False),
           ("What animal is in the video?", "A large rabbit.", True),
           ("What is the capital of France?", "Paris is the capital of France.", False)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"))
    parser.add_argument("--video", default=os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peer", action="store_true", help="also run the official implementation + peft")
    return parser.parse_args()


def step_times(trainable, optimizer, batch, total, steps):
    from mindspore import Tensor
    times, losses = [], []
    for i in range(steps + 1):
        start = time.perf_counter()
        loss, _, grads = trainable.loss_and_grads([batch], total)
        optimizer.apply([Tensor(g) for g in grads], 1e-4)
        if i:
            times.append(time.perf_counter() - start)
        losses.append(loss)
    return statistics.median(times), losses


def ours(args):
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from mindspore import Tensor
    from cogvlm2 import CogVLM2Config, CogVLM2ForVideo
    from cogvlm2.cogvlm2_lora import LoraConfig, apply_lora
    from cogvlm2.cogvlm2_processor import CogVLM2Processor
    from cogvlm2.cogvlm2_train import AdamW, Trainable, freeze_for_full, freeze_for_lora
    from cogvlm2.cogvlm2_train_data import build_training_sample, collate
    model = CogVLM2ForVideo(CogVLM2Config.from_hf_config(args.config))
    rng = np.random.default_rng(0)
    for _, param in model.parameters_and_names():
        param.set_data(Tensor(rng.standard_normal(param.shape, dtype=np.float32) * 0.02))
    processor = CogVLM2Processor().apply_model_config(model.config)
    frames = processor.load_video(args.video)[0]
    samples = [build_training_sample(processor, q, a, video=frames if v else None) for q, a, v in SAMPLES]
    batch, total = collate(samples, 128002), sum(s["n_label"] for s in samples)
    r = {"samples": len(samples), "tokens": [len(s["input_ids"]) for s in samples], "label_tokens": total}
    apply_lora(model, LoraConfig(8, 32, 0.0, ["language_expert_query_key_value", "language_expert_dense"]))
    params = freeze_for_lora(model)
    r["lora_trainable_params"] = sum(p.size for p in params)
    r["lora_step_s"], r["lora_losses"] = step_times(Trainable(model, params), AdamW(params), batch, total, args.steps)
    params = freeze_for_full(model, freeze_vision=False)   # LoRA weights stay (B trained a little): full FT on top
    r["full_trainable_params"] = sum(p.size for p in params)
    r["full_step_s"], r["full_losses"] = step_times(Trainable(model, params), AdamW(params), batch, total, args.steps)
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return r


def main():
    args = parse_args()
    r = ours(args)
    rows = [("LoRA step (s)", r["lora_step_s"]), ("full step (s)", r["full_step_s"])]
    peer = None
    if args.peer and os.path.exists(PEER_PYTHON):
        out = subprocess.run([PEER_PYTHON, PEER_SCRIPT, args.video, "--steps", str(args.steps)],
                             capture_output=True, text=True, cwd=os.path.dirname(PEER_SCRIPT), check=True)
        peer = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"batch: {r['samples']} samples, tokens {r['tokens']}, {r['label_tokens']} label tokens")
    print(f"{'':16} {'ours':>10} {'peer':>10} {'peer/ours':>10}")
    for label, key in (("LoRA step (s)", "lora_step_s"), ("full step (s)", "full_step_s")):
        theirs = peer[key] if peer else float("nan")
        print(f"{label:16} {r[key]:10.3f} {theirs:10.3f} {theirs / r[key]:10.2f}")
    print(f"{'LoRA samples/s':16} {r['samples'] / r['lora_step_s']:10.2f} "
          f"{(r['samples'] / peer['lora_step_s']) if peer else float('nan'):10.2f}")
    print(f"{'full samples/s':16} {r['samples'] / r['full_step_s']:10.2f} "
          f"{(r['samples'] / peer['full_step_s']) if peer else float('nan'):10.2f}")
    print(f"{'peak RSS (MB)':16} {r['peak_rss_mb']:10.0f} {peer['peak_rss_mb'] if peer else float('nan'):10.0f}")
    print(json.dumps({"ours": r, "peer": peer}))


if __name__ == "__main__":
    main()
