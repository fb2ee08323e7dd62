"""run_finetune.py as a user runs it: the tiny LoRA YAML from adapter_init/ gives the golden losses,
--resume after a kill equals an uninterrupted run, msrun with 2 CPU workers equals one process, full
fine-tuning writes a checkpoint that from_pretrained and the engine load, and each bad input is one
clear line with nothing half-written.

Only what needs a process of its own (the SIGKILL, msrun) starts one; the other runs call
``run_finetune.main(argv)`` in this process (the same code path after argument parsing: one error
line on stderr, exit code 2), which saves an interpreter start and a MindSpore import per run."""
import json
import logging
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
FULL_YAML = os.path.join(ROOT, "configs", "cogvlm2", "finetune_cogvlm2_video_tiny_full.yaml")
TINY = os.path.join(FIXTURES, "tiny_chat")
ENV = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3")   # LOCAL_DEFAULT_PATH: set per test (quiet_mindformers)
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


def child_env(log_dir=None):
    """ENV with mindformers' log folder out of the repository (the test's, or ``log_dir``)."""
    return dict(ENV, LOCAL_DEFAULT_PATH=log_dir or os.environ["LOCAL_DEFAULT_PATH"])


def run(args, timeout=300, log_dir=None):
    return subprocess.run(args, env=child_env(log_dir), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture(autouse=True)
def quiet_mindformers(tmp_path, monkeypatch):
    """mindformers' logger writes to ./output/log (LOCAL_DEFAULT_PATH) and to the stdout stream it found
    when it was created; under pytest that is an earlier test's closed capture stream, and logging
    would print a '--- Logging error ---' traceback to stderr. In a user's process neither happens."""
    monkeypatch.setenv("LOCAL_DEFAULT_PATH", str(tmp_path / "mindformers_output"))
    monkeypatch.setattr(logging, "raiseExceptions", False)


def run_main(args, capsys):
    """``run_finetune.main`` in this process on ``command(...)``'s arguments (after the script path)."""
    sys.path.insert(0, ROOT)
    try:
        import run_finetune
    finally:
        sys.path.remove(ROOT)
    capsys.readouterr()
    code = run_finetune.main(args[2:])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


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
    result = run(command(data, out), log_dir=os.path.join(folder, "log"))   # one run as a user types it
    assert result.returncode == 0, result.stderr[-3000:]
    return data, out


def test_cli_losses_equal_golden(uninterrupted, golden_losses):
    _, out = uninterrupted
    lines = log_losses(out)
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert np.abs(np.asarray([line["loss"] for line in lines]) - golden_losses).max() <= 2e-5
    assert all(line["label_tokens"] == 44 and line["learning_rate"] == 1e-3 for line in lines)
    assert sorted(os.listdir(os.path.join(out, "adapter"))) == ["adapter_config.json", "adapter_model.safetensors"]


def test_resume_after_kill_equals_uninterrupted(uninterrupted, tmp_path, capsys):
    data, reference = uninterrupted
    out = str(tmp_path / "out")
    process = subprocess.Popen(command(data, out), env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    checkpoint = os.path.join(out, "checkpoints", "step_3")
    while not os.path.isdir(checkpoint) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.isdir(checkpoint)
    again = run_main(command(data, out), capsys)           # without --resume: refused
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_main(command(data, out, "--resume"), capsys)
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


def test_bad_datasets_are_one_line(tmp_path, capsys):
    for i, (records, message) in enumerate(BAD):
        folder = str(tmp_path / str(i))
        data = write_dataset(folder, records, video=False)
        out = os.path.join(folder, "out")
        result = run_main(command(data, out), capsys)
        assert result.returncode == 2, (message, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not os.path.exists(os.path.join(out, "adapter"))


def test_corrupt_video_names_the_line_or_is_skipped(tmp_path, capsys):
    folder = str(tmp_path)
    data = write_dataset(folder, [SAMPLES[1], {"query": "q", "response": "a", "videos": ["bad.mp4"]}], video=False)
    with open(os.path.join(folder, "bad.mp4"), "wb") as f:
        f.write(b"not a video")
    result = run_main(command(data, str(tmp_path / "out")), capsys)
    assert result.returncode == 2 and "data.jsonl:2" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
    args = command(data, str(tmp_path / "out2"), "--skip_bad_samples")
    args[args.index("--config") + 1] = lora_yaml_with(folder, "train_steps: 5", "train_steps: 2")
    skipped = run_main(args, capsys)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "skipped 1 bad samples (lines [2])" in skipped.stdout
    assert [line["samples"] for line in log_losses(str(tmp_path / "out2"))] == [2, 1]


def test_sample_longer_than_context_names_line_and_length_or_is_skipped(tmp_path, capsys):
    """The tiny YAML's context is 2048 tokens; line 2 needs 2048 + 32 prompt tokens more."""
    long_query = " ".join(["rabbit"] * 2100)
    data = write_dataset(str(tmp_path), [SAMPLES[1], {"query": long_query, "response": "a"}], video=False)
    result = run_main(command(data, str(tmp_path / "out")), capsys)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    line = result.stderr
    assert "data.jsonl:2:" in line and "more than the context of 2048" in line and "--skip_bad_samples" in line
    needed = int(line.split("the sample needs ")[1].split(" tokens")[0])
    assert needed > 2100, line
    assert not os.path.exists(str(tmp_path / "out" / "adapter"))
    args = command(data, str(tmp_path / "out2"), "--skip_bad_samples")
    args[args.index("--config") + 1] = lora_yaml_with(str(tmp_path), "train_steps: 5", "train_steps: 2")
    skipped = run_main(args, capsys)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "skipped 1 bad samples (lines [2])" in skipped.stdout
    # global batches of 3 over the 2 lines: [1, 2, 1], [2, 1, 2] without line 2
    assert [line["samples"] for line in log_losses(str(tmp_path / "out2"))] == [2, 1]


def lora_yaml_with(folder, old, new):
    """A copy of the tiny LoRA YAML with one setting changed."""
    with open(LORA_YAML, encoding="utf-8") as f:
        text = f.read()
    assert old in text
    path = os.path.join(folder, "changed.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new))
    return path


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    """lr 1e30: step 1 is finite and applied (AdamW moves every LoRA weight by ~1e30), so the loss of
    step 2 overflows. The run stops before applying step 2, names it and the step-1 checkpoint, and
    writes no adapter; --resume would start from step 1."""
    data = write_dataset(str(tmp_path), SAMPLES[1:2], video=False)
    out = str(tmp_path / "out")
    args = command(data, out)
    args[args.index("--config") + 1] = lora_yaml_with(str(tmp_path), "learning_rate: 1.e-3", "learning_rate: 1.e+30")
    result = run_main(args, capsys)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "at step 2" in result.stderr and "stopped before applying it" in result.stderr, result.stderr
    assert os.path.join(out, "checkpoints", "step_1") in result.stderr, result.stderr
    assert [line["step"] for line in log_losses(out)] == [1]
    assert np.isfinite(log_losses(out)[0]["loss"])
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_1"]
    assert not os.path.exists(os.path.join(out, "adapter"))


def test_adapter_rank_differs_from_yaml(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(os.path.join(TRAIN, "adapter"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 8
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    data = write_dataset(str(tmp_path), [SAMPLES[1]], video=False)
    args = command(data, str(tmp_path / "out"))
    args[args.index("--init_adapter") + 1] = str(adapter)
    result = run_main(args, capsys)
    assert result.returncode == 2 and "rank 8 vs 4" in result.stderr, result.stderr


def test_full_finetuning_checkpoint_loads_in_from_pretrained_and_engine(tmp_path, capsys):
    """The tiny full-FT YAML (golden hyperparameters, vision tower trained): the 3 logged losses equal
    the official code's; the saved checkpoint, reloaded by CogVLM2ForVideo.from_pretrained, gives the
    golden loss after step 3, and the engine loaded from it answers as generate() on that model."""
    golden = np.load(os.path.join(TRAIN, "train_golden.npz"))
    data = write_dataset(str(tmp_path))
    out = str(tmp_path / "out")
    args = [a for a in command(data, out) if a != os.path.join(TRAIN, "adapter_init")]
    args.remove("--init_adapter")
    args[args.index("--config") + 1] = FULL_YAML
    result = run_main(args, capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = log_losses(out)
    assert np.abs(np.asarray([line["loss"] for line in lines]) - golden["full_losses"]).max() <= 1e-4
    checkpoint = os.path.join(out, "checkpoint")
    assert os.path.isfile(os.path.join(checkpoint, "config.json"))
    from cogvlm2.cogvlm2 import CogVLM2ForVideo
    from cogvlm2.cogvlm2_engine import CogVLM2Engine
    from cogvlm2.cogvlm2_generation import generate
    from cogvlm2.cogvlm2_processor import CogVLM2Processor
    from cogvlm2.cogvlm2_train import Trainable
    from cogvlm2.cogvlm2_train_data import build_training_sample, collate
    model = CogVLM2ForVideo.from_pretrained(checkpoint)
    processor = CogVLM2Processor()
    video = os.path.join(FIXTURES, "bigbuckbunny.mp4")
    samples = [build_training_sample(processor, s["query"], s["response"],
                                     [tuple(t) for t in s.get("history", [])],
                                     video=video if s.get("videos") else None) for s in SAMPLES]
    loss, _, _ = Trainable(model, [model.lm_head.weight]).loss_and_grads([collate(samples, 128002)], 44)
    assert abs(loss - float(golden["full_loss_after_last_step"])) <= 1e-4
    inputs = processor.build_inputs("Please describe this video.", None, None)
    expected = generate(model, input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"],
                        position_ids=inputs["position_ids"], max_new_tokens=8).new_tokens[0].tolist()
    with CogVLM2Engine.from_pretrained(checkpoint) as engine:
        answer = engine.submit("Please describe this video.", max_new_tokens=8).result(120)
    assert answer.new_tokens == expected, (answer.new_tokens, expected)


def test_mindformers_trainer_flow(tmp_path, monkeypatch):
    """What run_mindformer.py --register_path REPO --config <tiny LoRA YAML> --run_mode finetune
    --load_checkpoint ... --train_dataset_dir data.jsonl does: build_context, Trainer(config).finetune.
    The YAML's trainer (CogVLM2FinetuneTrainer, auto-registered) runs the plugin's loop: the losses of
    the first 2 steps equal the official code's and the adapter lands in <output_dir>/finetune."""
    from mindformers.core.context import build_context
    from mindformers.tools.register import MindFormerConfig
    from mindformers.trainer import Trainer
    from mindformers.utils.file_utils import set_output_path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REGISTER_PATH", ROOT)
    monkeypatch.syspath_prepend(ROOT)
    data = write_dataset(str(tmp_path / "data"))
    config = MindFormerConfig(LORA_YAML)
    config.run_mode = "finetune"
    config.load_checkpoint = TINY
    config.train_dataset.data_loader.dataset_dir = data
    config.output_dir = str(tmp_path / "output")
    config.finetune.train_steps = 2
    config.finetune.init_adapter = os.path.join(TRAIN, "adapter_init")
    set_output_path(config.output_dir)
    build_context(config)
    Trainer(config).finetune(finetune_checkpoint=config.load_checkpoint)
    out = os.path.join(config.output_dir, "finetune")
    golden = np.load(os.path.join(TRAIN, "train_golden.npz"))["lora_losses"][:2]
    assert np.abs(np.asarray([line["loss"] for line in log_losses(out)]) - golden).max() <= 2e-5
    assert sorted(os.listdir(os.path.join(out, "adapter"))) == ["adapter_config.json", "adapter_model.safetensors"]
