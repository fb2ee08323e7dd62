"""Dataset-mode throughput (a script that prints figures, not a test).

    python benchmarks/bench_dataset.py [--videos 64] [--new-tokens 64] [--per-video-runs 4]

Writes a random-weight HF checkpoint of the bench config (benchmarks/bench_config.json) and
``--videos`` short videos (the fixture video's frames re-encoded with OpenCV's mp4v writer at 4
lengths x 4 sizes, each from another start frame so no two are equal and the vision cache never hits)
into a temporary folder, then runs, each as a user would type it (end-to-end wall time, start-up and
weight loading included):

- one ``run_predict.py`` process per video (what users do today): ``--per-video-runs`` videos only,
  the per-video time extrapolated to the whole set;
- the dataset mode, ``--predict_batch_size 1`` and ``8``;
- the dataset mode, batch 8, under ``msrun`` with 2 workers of 1 MindSpore thread each, against 1
  process with 2 threads (``runtime_num_threads``, set by a small wrapper before run_predict runs).

and prints videos/min for each, with the model-idle-waiting-for-frames fraction the dataset mode reports.
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PREDICT = os.path.join(REPO, "run_predict.py")
FIXTURE = os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4")
PROMPT = "Describe this video."
# sets MindSpore's CPU kernel threads, then runs run_predict.py as __main__
THREADS_WRAPPER = """import os, runpy, sys
import mindspore as ms
ms.set_context(runtime_num_threads=int(os.environ["BENCH_THREADS"]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "benchmarks", "bench_config.json"))
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--per-video-runs", type=int, default=4,
                        help="videos run as one process each (the figure is extrapolated from them)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["per-video", "batch1", "batch8", "threads"])
    return parser.parse_args()


def make_videos(folder: str, count: int):
    """``count`` mp4 clips of 2-5 s at 4 sizes, cut from the fixture's frames at different starts."""
    from bench_clips import read_frames, write_clip
    frames, fps = read_frames(FIXTURE)
    sizes = [(320, 180), (480, 270), (640, 360), (256, 256)]
    lengths = [2, 3, 4, 5]                                   # seconds: 3-6 frames with the chat template
    paths = []
    for number in range(count):
        seconds = lengths[(number // 4) % 4]
        start = (number * 7) % max(1, len(frames) - int(seconds * fps))
        clip = [frames[(start + i) % len(frames)] for i in range(int(seconds * fps))]
        paths.append(write_clip(os.path.join(folder, f"clip{number:03d}.mp4"), clip, fps, sizes[number % 4]))
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_run(command, env, log_files=()):
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    text = proc.stderr + "".join(open(f, errors="replace").read() for f in log_files if os.path.exists(f))
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}\n{text[-3000:]}")
    return seconds, text


def idle_fractions(text: str):
    return [float(x) for x in re.findall(r"model idle waiting for frames ([\d.]+)%", text)]


def main():
    args = parse_args()
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench_convert import write_checkpoint           # the random bf16 HF checkpoint writer
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "GLOG_v": "3"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_dataset_") as tmp:
        checkpoint = os.path.join(tmp, "ckpt")
        os.mkdir(checkpoint)
        write_checkpoint(args.config, checkpoint, shards=1, seed=0)
        videos = make_videos(tmp, args.videos)
        data = os.path.join(tmp, "data.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for path in videos:
                f.write(json.dumps({"id": os.path.basename(path), "query": PROMPT, "videos": [path],
                                    "max_new_tokens": args.new_tokens}) + "\n")
        wrapper = os.path.join(tmp, "threads.py")
        with open(wrapper, "w", encoding="utf-8") as f:
            f.write(THREADS_WRAPPER)
        base = ["--load_checkpoint", checkpoint, "--device_target", "CPU"]
        n = len(videos)
        print(f"{n} videos (2-5 s, 180p-360p, mp4v), {args.new_tokens} new tokens each, bench model "
              f"{args.config} with random weights", flush=True)

        if "per-video" not in args.skip:
            times = []
            for path in videos[:args.per_video_runs]:
                seconds, _ = timed_run([sys.executable, RUN_PREDICT, *base, "--predict_data", path, PROMPT,
                                        "--modal_type", "video", "text", "--max_new_tokens", str(args.new_tokens)],
                                       {**env, "PWD": tmp})
                times.append(seconds)
            per_video = float(np.mean(times))
            rows.append((f"one run_predict.py process per video ({len(times)} run, extrapolated)",
                         60 / per_video, per_video * n, None))

        def dataset_run(label, batch, threads=None, msrun=False):
            output = os.path.join(tmp, f"answers_{len(rows)}.jsonl")
            command = [RUN_PREDICT, *base, "--predict_data", data, "--output_file", output,
                       "--predict_batch_size", str(batch)]
            run_env = dict(env)
            if threads is not None:
                command = [wrapper] + command
                run_env["BENCH_THREADS"] = str(threads)
            logs = ()
            if msrun:
                log_dir = os.path.join(tmp, f"msrun_{len(rows)}")
                command = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
                           f"--log_dir={log_dir}", "--join=True"] + command
                logs = [os.path.join(log_dir, f"worker_{r}.log") for r in range(2)]
            else:
                command = [sys.executable] + command
            seconds, text = timed_run(command, run_env, logs)
            with open(output, encoding="utf-8") as f:
                answers = [json.loads(line) for line in f]
            assert len(answers) == n and not [a for a in answers if "error" in a], "every video answered"
            idle = idle_fractions(text)
            rows.append((label, 60 * n / seconds, seconds, max(idle) if idle else None))

        if "batch1" not in args.skip:
            dataset_run("dataset mode, batch 1", 1)
        if "batch8" not in args.skip:
            dataset_run("dataset mode, batch 8", 8)
        if "threads" not in args.skip:
            dataset_run("dataset mode, batch 8, 1 process x 2 threads", 8, threads=2)
            dataset_run("dataset mode, batch 8, msrun 2 workers x 1 thread", 8, threads=1, msrun=True)

    print(f"\n| mode | videos/min | wall time for {n} videos | model idle waiting for frames |")
    print("|---|---|---|---|")
    for label, rate, seconds, idle in rows:
        print(f"| {label} | {rate:.1f} | {seconds:.0f} s | {'-' if idle is None else f'{idle:.1f}%'} |")
    if rows and rows[0][0].startswith("one run_predict"):
        for label, rate, _, _ in rows[1:]:
            print(f"{label}: {rate / rows[0][1]:.1f}x the process-per-video figure")


if __name__ == "__main__":
    main()
