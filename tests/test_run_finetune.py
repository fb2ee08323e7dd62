"""run_finetune.py as a user runs it (subprocesses): the tiny LoRA YAML from adapter_init/ gives the
golden losses, --resume after a kill equals an uninterrupted run, msrun with 2 CPU workers equals one
process, and each bad input is one clear line with nothing half-written."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TRAIN = os.path.join(FIXTURES, "train_tiny_chat")
LORA_YAML = os.path.join(ROOT, "configs", "cogvlm2", "finetune_cogvlm2_video_tiny_lora.yaml")
TINY = os.path.join(FIXTURES, "tiny_chat")
ENV = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3")
SAMPLES = [
    {"query": "Please describe this video.",
     "response": "A big rabbit walks out of his burrow and stretches in the morning sun.", "videos": ["clip.mp4"]},
    {"query": "Tell me a short joke.", "history": [["Hi!", "Hello! How can I help you today?"]],
     "response": "Why did the scarecrow win an award? He was outstanding in his field."},
    {"query": "视频里有什么动物？", "response": "视频里有一只大兔子。", "videos": ["clip.mp4"]},
]


def write_dataset(folder, records=SAMPLES, video=True):
    os.makedirs(folder, exist_ok=True)
    if video:
        shutil.copy(os.path.join(FIXTURES, "bigbuckbunny.mp4"), os.path.join(folder, "clip.mp4"))
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


def command(data, out, *extra):
    return [sys.executable, os.path.join(ROOT, "run_finetune.py"), "--config", LORA_YAML, "--load_checkpoint", TINY,
            "--train_dataset", data, "--output_dir", out, "--init_adapter", os.path.join(TRAIN, "adapter_init"),
            "--no_progress", *extra]


def run(args, timeout=300):
    return subprocess.run(args, env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def log_losses(out):
    with open(os.path.join(out, "train_log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def adapter_arrays(out):
    from safetensors.numpy import load_file
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def golden_losses():
    return np.load(os.path.join(TRAIN, "train_golden.npz"))["lora_losses"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, golden_losses):
    folder = str(tmp_path_factory.mktemp("ft"))
    data = write_dataset(folder)
    out = os.path.join(folder, "out")
    result = run(command(data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return data, out


def test_cli_losses_equal_golden(uninterrupted, golden_losses):
    _, out = uninterrupted
    lines = log_losses(out)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert np.abs(np.asarray([line["loss"] for line in lines]) - golden_losses).max() <= 2e-5
    assert all(line["label_tokens"] == 44 and line["learning_rate"] == 1e-3 for line in lines)
    assert sorted(os.listdir(os.path.join(out, "adapter"))) == ["adapter_config.json", "adapter_model.safetensors"]


def test_resume_after_kill_equals_uninterrupted(uninterrupted, tmp_path):
    data, reference = uninterrupted
    out = str(tmp_path / "out")
    process = subprocess.Popen(command(data, out), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    checkpoint = os.path.join(out, "checkpoints", "step_3")
    while not os.path.isdir(checkpoint) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.isdir(checkpoint)
    again = run(command(data, out))                        # without --resume: refused
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run(command(data, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [line["step"] for line in log_losses(out)] == [1, 2, 3, 4, 5]
    ours, theirs = adapter_arrays(out), adapter_arrays(reference)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert [line["loss"] for line in log_losses(out)] == [line["loss"] for line in log_losses(reference)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("msrun") is None, reason="msrun (MindSpore's launcher) not on PATH")
def test_msrun_two_workers_equal_one_process(uninterrupted, tmp_path):
    data, reference = uninterrupted
    out = str(tmp_path / "out")
    args = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
            f"--log_dir={tmp_path / 'msrun_log'}", "--join=True"] + command(data, out)[1:]
    result = run(args, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ours, theirs = log_losses(out), log_losses(reference)
    assert np.abs(np.asarray([l["loss"] for l in ours]) - [l["loss"] for l in theirs]).max() <= 2e-6
    single, parallel = adapter_arrays(reference), adapter_arrays(out)
    assert max(np.abs(parallel[k] - single[k]).max() for k in single) <= 1e-6


BAD = [
    ([{"query": "q"}], "'response' is missing"),
    ([{"query": "q", "response": "a", "videos": ["nope.mp4"]}], "data.jsonl:1: video file not found"),
    ([], "has no samples"),
    (["{not json"], "data.jsonl:1: not valid JSON"),
]


@pytest.mark.parametrize("records, message", BAD)
def test_bad_dataset_is_one_line(tmp_path, records, message):
    data = write_dataset(str(tmp_path), records, video=False)
    out = str(tmp_path / "out")
    result = run(command(data, out))
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not os.path.exists(os.path.join(out, "adapter"))


def test_corrupt_video_names_the_line_or_is_skipped(tmp_path):
    folder = str(tmp_path)
    data = write_dataset(folder, [SAMPLES[1], {"query": "q", "response": "a", "videos": ["bad.mp4"]}], video=False)
    with open(os.path.join(folder, "bad.mp4"), "wb") as f:
        f.write(b"not a video")
    result = run(command(data, str(tmp_path / "out")))
    assert result.returncode == 2 and "data.jsonl:2" in result.stderr, result.stderr
    skipped = run(command(data, str(tmp_path / "out2"), "--skip_bad_samples"))
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "skipped 1 bad samples (lines [2])" in skipped.stdout


def test_adapter_rank_differs_from_yaml(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(os.path.join(TRAIN, "adapter"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 8
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    data = write_dataset(str(tmp_path), [SAMPLES[1]], video=False)
    args = command(data, str(tmp_path / "out"))
    args[args.index("--init_adapter") + 1] = str(adapter)
    result = run(args)
    assert result.returncode == 2 and "rank 8 vs 4" in result.stderr, result.stderr
