"""Fine-tuning step benchmark on a random-weight model, ours against the official code + peft
(prints figures; not a test).

    python benchmarks/bench_finetune.py [--config benchmarks/bench_config.json] [--video V] [--steps 3]
        [--rounds 1] [--micro grouped|single|one] [--no-peer] [--modes lora,lora-rc,full,full-rc] [--frames N]

The batch of the peer's script (/work/shared/peer/bench_finetune_peer.py): 4 samples, 2 with the video
(chat template) and 2 text-only, short responses; token-weighted loss over the 4 samples, then one
AdamW step. LoRA: r 8, alpha 32 on language_expert_query_key_value and language_expert_dense, vision
frozen. Full: every parameter (vision tower included). ``-rc``: activation recompute on every decoder
and vision layer (the YAML's recompute_config.recompute). Medians over --steps after one warm-up step.

Micro-batches (gradients accumulate over them, the loss is the same): ``grouped`` = the two video
samples together, then the two text samples (padding only within equal kinds), ``single`` = one
sample at a time (as the peer runs them), ``one`` = all four right-padded into one batch (the text
samples padded to the video length: 4x the attention memory of ``grouped``).

Every configuration runs in its own child process, so each peak RSS (ru_maxrss) is its own; the peer
(its venv, 2 threads, LoRA then full in one process) runs between our children, in the same run, so
the ratios compare runs under the same machine load. Step profile (LoRA/full, first measured step):
frozen vision tower forward outside the graph, the loss+gradient graph (decoder forward/backward, and
the tower when it trains), gradient copies, the AdamW graph.
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
MODES = ("lora", "lora-rc", "full", "full-rc")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"))
    parser.add_argument("--video", default=os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="ours and the peer alternate this many times")
    parser.add_argument("--micro", choices=("grouped", "single", "one"), default="grouped")
    parser.add_argument("--frames", type=int, default=0,
                        help="repeat the video's frames to N (24: what the model takes from a 24 s clip); "
                             "0: the video as it is (the peer's batch)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--no-peer", action="store_true", help="skip the official implementation")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args()


def micro_batches(samples, micro):
    from cogvlm2.cogvlm2_train_data import collate
    if micro == "one":
        groups = [samples]
    elif micro == "single":
        groups = [[s] for s in samples]
    else:   # video samples together, text samples together
        groups = [[s for s in samples if s["pixel_values"] is not None],
                  [s for s in samples if s["pixel_values"] is None]]
    return [collate(g, 128002) for g in groups if g]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args):
    """One configuration: prints one JSON line."""
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from cogvlm2 import CogVLM2Config, CogVLM2ForVideo
    from cogvlm2.cogvlm2_loading import fill_random_weights
    from cogvlm2.cogvlm2_lora import LoraConfig, apply_lora
    from cogvlm2.cogvlm2_processor import CogVLM2Processor
    from cogvlm2.cogvlm2_train import AdamW, Trainable, freeze_for_full, freeze_for_lora
    from cogvlm2.cogvlm2_train_data import build_training_sample
    mode = args.child
    r = {"mode": mode, "micro": args.micro, "rss_interpreter_mb": rss_mb()}
    model = CogVLM2ForVideo(CogVLM2Config.from_hf_config(args.config))
    fill_random_weights(model)
    processor = CogVLM2Processor().apply_model_config(model.config)
    frames = processor.load_video(args.video)[0]
    if args.frames:
        frames = np.resize(frames, (args.frames,) + frames.shape[1:])   # the clip's frames over and over
    samples = [build_training_sample(processor, q, a, video=frames if v else None) for q, a, v in SAMPLES]
    batches, total = micro_batches(samples, args.micro), sum(s["n_label"] for s in samples)
    r.update(samples=len(samples), tokens=[len(s["input_ids"]) for s in samples], label_tokens=total,
             micro_shapes=[list(b["input_ids"].shape) for b in batches])
    if mode.startswith("lora"):
        apply_lora(model, LoraConfig(8, 32, 0.0, ["language_expert_query_key_value", "language_expert_dense"]))
        params = freeze_for_lora(model)
    else:
        params = freeze_for_full(model, freeze_vision=False)
    r["trainable_params"] = int(sum(p.size for p in params))
    r["rss_weights_mb"] = rss_mb()
    trainable = Trainable(model, params, recompute=mode.endswith("-rc"))
    optimizer = AdamW(params)
    times, losses, profile = [], [], None
    for i in range(args.steps + 1):
        phases = {"vision_s": 0.0, "grad_graph_s": 0.0, "grad_copy_s": 0.0, "adamw_s": 0.0}
        start = time.perf_counter()
        grads = None
        loss = 0.0
        for batch in batches:
            if not trainable.vision_trains and batch["pixel_values"] is not None:
                t = time.perf_counter()   # the frozen tower alone (micro_step runs it again below)
                model.encode_video(batch["pixel_values"]).asnumpy()
                phases["vision_s"] += time.perf_counter() - t
            t = time.perf_counter()
            _, ce, step_grads = trainable.micro_step(batch, 1.0 / total)
            phases["grad_graph_s"] += time.perf_counter() - t
            t = time.perf_counter()
            if grads is None:   # as Trainable.loss_and_grads accumulates
                grads = [g.asnumpy().copy() for g in step_grads]
            else:
                for acc, g in zip(grads, step_grads):
                    acc += g.asnumpy()
            phases["grad_copy_s"] += time.perf_counter() - t
            loss += float(ce.astype(np.float64).sum()) / total
        t = time.perf_counter()
        optimizer.apply(grads, 1e-4)
        phases["adamw_s"] = time.perf_counter() - t
        # the step time does not count the separately timed tower run
        elapsed = time.perf_counter() - start - phases["vision_s"]
        if i:
            times.append(elapsed)
            profile = profile or phases
        losses.append(loss)
    profile["grad_graph_s"] -= profile["vision_s"]   # micro_step includes the frozen tower's forward
    r.update(step_s=statistics.median(times), step_times=times, losses=losses, profile=profile,
             peak_rss_mb=rss_mb())
    print(json.dumps(r))


def run_ours(args, mode):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--config", args.config, "--video", args.video,
           "--steps", str(args.steps), "--micro", args.micro, "--frames", str(args.frames)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), GLOG_v="3")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"mode": mode, "error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_peer(args):
    start = time.perf_counter()
    out = subprocess.run([PEER_PYTHON, PEER_SCRIPT, args.video, "--steps", str(args.steps)],
                         capture_output=True, text=True, cwd=os.path.dirname(PEER_SCRIPT))
    if out.returncode != 0:
        return {"error": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["wall_s"] = time.perf_counter() - start
    return r


def fmt(x, spec="10.3f"):
    return format(x, spec) if isinstance(x, (int, float)) and x == x else f"{'-':>10}"


def report(ours, peer):
    first = next((r for r in ours.values() if "tokens" in r), None)
    if first:
        print(f"batch: {first['samples']} samples, tokens {first['tokens']}, {first['label_tokens']} label tokens; "
              f"micro-batches {first['micro_shapes']}")
    if peer and "tokens" in peer:
        print(f"peer:  tokens {peer['tokens']}, {peer['label_tokens']} label tokens, {peer['threads']} threads, "
              "one sample at a time")
    print(f"{'':12} {'step s':>10} {'samples/s':>10} {'peak RSS MB':>12} {'peer step s':>12} {'peer/ours':>10} "
          f"{'peer RSS MB':>12}")
    for mode, r in ours.items():
        if "error" in r:
            print(f"{mode:12} {r['error']}")
            continue
        key = "lora_step_s" if mode.startswith("lora") else "full_step_s"
        theirs = peer.get(key, float("nan")) if peer else float("nan")
        print(f"{mode:12} {r['step_s']:10.3f} {r['samples'] / r['step_s']:10.2f} {r['peak_rss_mb']:12.0f} "
              f"{fmt(theirs, '12.3f')} {fmt(theirs / r['step_s'], '10.2f')} "
              f"{fmt(peer.get('peak_rss_mb', float('nan')) if peer else float('nan'), '12.0f')}")
    for mode, r in ours.items():
        if "profile" in r:
            p = r["profile"]
            print(f"profile {mode:8} frozen vision {p['vision_s']:.3f} s, loss+grad graph {p['grad_graph_s']:.3f} s, "
                  f"grad copies {p['grad_copy_s']:.3f} s, AdamW {p['adamw_s']:.3f} s; "
                  f"RSS after weights {r['rss_weights_mb']:.0f} MB")
    if peer and "lora_losses" in peer:
        print(f"peer losses: LoRA {[round(x, 4) for x in peer['lora_losses']]}, "
              f"full {[round(x, 4) for x in peer['full_losses']]} (its own random weights)")


def main():
    args = parse_args()
    if args.child:
        return child(args)
    modes = [m for m in args.modes.split(",") if m]
    # the peer's script takes the video as it is: with --frames the batches would differ
    peer_ok = not args.no_peer and not args.frames and os.path.exists(PEER_PYTHON) and os.path.exists(PEER_SCRIPT)
    rounds = []
    for round_index in range(args.rounds):
        ours, peer = {}, None
        for i, mode in enumerate(modes):
            ours[mode] = run_ours(args, mode)
            print(f"[round {round_index + 1}] {mode}: {json.dumps(ours[mode])}", file=sys.stderr, flush=True)
            if peer_ok and peer is None and (i == len(modes) // 2 - 1 or len(modes) == 1):
                peer = run_peer(args)   # between our LoRA and full children
                print(f"[round {round_index + 1}] peer: {json.dumps(peer)}", file=sys.stderr, flush=True)
        if peer_ok and peer is None:
            peer = run_peer(args)
        print(f"\n== round {round_index + 1} (micro-batches: {args.micro}"
              f"{f', video frames repeated to {args.frames}' if args.frames else ''}) ==")
        report(ours, peer)
        rounds.append({"ours": ours, "peer": peer})
    print(json.dumps(rounds))


if __name__ == "__main__":
    main()
