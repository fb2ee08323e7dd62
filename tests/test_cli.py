"""run_predict.py: the README's main job end to end (a subprocess, as a user runs it), streaming and
batches, and every command-line error (in-process: one line on stderr, exit code 2, no traceback)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PREDICT = os.path.join(REPO, "run_predict.py")
FIXTURES = os.path.join(REPO, "tests", "fixtures")
TINY = os.path.join(FIXTURES, "tiny_chat")
VIDEO = os.path.join(FIXTURES, "bigbuckbunny.mp4")
PROMPT = "Please describe this video."
TINY_YAML = os.path.join(REPO, "configs", "cogvlm2", "predict_cogvlm2_video_tiny.yaml")
REAL_YAML = os.path.join(REPO, "configs", "cogvlm2", "predict_cogvlm2_video_llama3_chat_13b.yaml")
RESULT_FILE = "multi_modal_to_text_generation_result.txt"


# every test runs in its own working directory (conftest.py's workdir)
pytestmark = pytest.mark.usefixtures("workdir")


def test_readme_command_prints_the_reference_answer(workdir, meta):
    """The README's command, in a fresh process from a directory laid out like the repository."""
    (workdir / "configs").symlink_to(os.path.join(REPO, "configs"))
    (workdir / "tests").symlink_to(os.path.join(REPO, "tests"))
    env = {k: v for k, v in os.environ.items() if k not in ("GLOG_v", "LOCAL_DEFAULT_PATH")}
    proc = subprocess.run(
        [sys.executable, RUN_PREDICT, "--config", "configs/cogvlm2/predict_cogvlm2_video_tiny.yaml",
         "--predict_data", "tests/fixtures/bigbuckbunny.mp4", PROMPT, "--modal_type", "video", "text"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == meta["gen_decoded"] + "\n"          # the official implementation's greedy answer
    for progress in ("loading weights from tests/fixtures/tiny_chat ... 8.4M parameters",
                     "answer 1/1: 6 frames, 412 prompt tokens; generated 20 tokens in", "tokens/s",
                     f"result saved to {RESULT_FILE}"):
        assert progress in proc.stderr
    assert "WARNING" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (workdir / RESULT_FILE).read_text(encoding="utf-8") == str([meta["gen_decoded"]])


def test_stream_batches_and_max_new_tokens(cli, capsys, monkeypatch, workdir, meta):
    """--stream prints tokens as they come; a batch of two questions answers like two single runs;
    run_mindformer.py's other flags are accepted."""
    from cogvlm2 import CogVLM2Tokenizer
    decode = CogVLM2Tokenizer().decode
    expected = [decode(meta["gen_new_tokens"][:8]), decode(meta["text_gen_new_tokens"][:8])]
    monkeypatch.setenv("REGISTER_PATH", "")          # --register_path sets it, as run_mindformer.py does
    monkeypatch.setattr(sys, "path", list(sys.path))
    two_questions = ["--predict_data", VIDEO, PROMPT, PROMPT, "--modal_type", "video", "text", "text",
                     "--config", TINY_YAML, "--load_checkpoint", TINY, "--max_new_tokens", "8",
                     "--run_mode", "predict", "--device_target", "CPU", "--device_id", "0", "--register_path", REPO]
    assert cli.main(two_questions + ["--stream"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "".join(answer + "\n" for answer in expected)
    assert captured.err.count("generated 8 tokens in") == 2        # one progress line per answer
    assert cli.main(two_questions + ["--predict_batch_size", "2"]) == 0
    assert capsys.readouterr().out == "".join(answer + "\n" for answer in expected)
    assert (workdir / RESULT_FILE).read_text(encoding="utf-8") == str(expected)


def test_error_before_loading_anything_in_a_fresh_process(workdir):
    proc = subprocess.run([sys.executable, RUN_PREDICT, "--config", TINY_YAML, "--predict_data", VIDEO, PROMPT,
                           "--modal_type", "video"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr == "error: --predict_data has 2 items but --modal_type has 1; give one modal type per " \
                          "item, e.g. --predict_data video.mp4 \"Describe it.\" --modal_type video text\n"
    assert proc.stdout == ""


def _text_file(path, text="not a video\n"):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _foreign_hf_dir(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 32}))
    from safetensors.numpy import save_file
    save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)}, str(path / "model.safetensors"))
    return str(path)


def _unknown_tensors_dir(path):
    path.mkdir()
    from safetensors.numpy import save_file
    save_file({"transformer.wte.weight": np.zeros((4, 4), np.float32)}, str(path / "model.safetensors"))
    return str(path)


def _tiny_yaml_with(path, top_level=None, **model_config):
    """A copy of the tiny YAML with some model_config keys (and top-level keys) changed."""
    import yaml
    with open(TINY_YAML, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config.update(top_level or {})
    config["model"]["model_config"].update(model_config)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


CASES = {   # name: (extra arguments, a piece of the message); the default question is VIDEO + PROMPT
    "unknown modal type": (["--modal_type", "video", "audio"], "unknown --modal_type 'audio'"),
    "lengths differ": (["--predict_data", VIDEO, PROMPT, PROMPT, "--modal_type", "video", "text"],
                       "--predict_data has 3 items but --modal_type has 2"),
    "text file as video": (lambda d: ["--predict_data", _text_file(d / "notes.txt"), PROMPT],
                           "does not fit --modal_type video: video files end in .mp4"),
    "video as image": (["--modal_type", "image", "text"],
                       "does not fit --modal_type image: it looks like a video file: use --modal_type video"),
    "text file named .mp4": (lambda d: ["--predict_data", _text_file(d / "clip.mp4"), PROMPT],
                             "is a text file, not a video"),
    "missing video": (["--predict_data", "nowhere.mp4", PROMPT], "video file not found: 'nowhere.mp4'"),
    "media without question": (["--predict_data", VIDEO, "--modal_type", "video"],
                               "has no question after it"),
    "missing config": (["--config", "configs/none.yaml"], "config file not found: 'configs/none.yaml'"),
    "missing checkpoint": (["--load_checkpoint", "no_such_dir"], "checkpoint directory not found: 'no_such_dir'"),
    "empty checkpoint dir": (lambda d: ["--load_checkpoint", str(d)],
                             "not a CogVLM2 checkpoint directory"),
    "foreign model": (lambda d: ["--load_checkpoint", _foreign_hf_dir(d / "llama")],
                      "is not a CogVLM2 model"),
    "checkpoint of other sizes": (["--config", REAL_YAML, "--device_target", "CPU", "--load_checkpoint", TINY],
                                  "the checkpoint does not fit"),
    "foreign tensors": (lambda d: ["--load_checkpoint", _unknown_tensors_dir(d / "other")],
                        "unknown tensor transformer.wte.weight"),
    "not predict": (["--run_mode", "train"], "run_predict.py only predicts"),
    # found when tried as a new user would (issue 8)
    "13B YAML without a checkpoint": (["--config", REAL_YAML, "--device_target", "CPU", "--load_checkpoint", ""],
                                      "sets no load_checkpoint; pass --load_checkpoint DIR"),
    "bf16 on CPU": (lambda d: ["--config", _tiny_yaml_with(d / "bf16.yaml", compute_dtype="bfloat16")],
                    "compute_dtype 'bfloat16' does not run on CPU"),
    "max_new_tokens 0": (["--max_new_tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    "max_new_tokens in YAML": (lambda d: ["--config", _tiny_yaml_with(d / "neg.yaml", max_new_tokens=-2)],
                               "max_new_tokens must be an integer >= 1, got -2"),
    "top_p in YAML": (lambda d: ["--config", _tiny_yaml_with(d / "topp.yaml", top_p="high")],
                      "top_p must be a number in (0, 1], got 'high'"),
    "empty YAML": (lambda d: ["--config", _text_file(d / "empty.yaml", "")], "empty.yaml' is empty"),
    "list YAML": (lambda d: ["--config", _text_file(d / "list.yaml", "- a\n- b\n")], "is a list, not a mapping"),
    "scalar YAML": (lambda d: ["--config", _text_file(d / "word.yaml", "hello\n")], "is a str, not a mapping"),
    "result folder missing": (lambda d: ["--config", _tiny_yaml_with(d / "save.yaml", {"save_file": "no/dir/r.txt"})],
                              "folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_errors_are_one_line(cli, capsys, workdir, case):
    extra, message = CASES[case]
    extra = extra(workdir) if callable(extra) else extra
    argv = ["--config", TINY_YAML, "--load_checkpoint", TINY, "--predict_data", VIDEO, PROMPT,
            "--modal_type", "video", "text"] + extra
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    *progress, error = captured.err.splitlines()     # a failed step's progress line, then the error
    assert error.startswith("error: ") and message in error, captured.err
    assert all(line.endswith(")") and "Traceback" not in line for line in progress), captured.err
    assert not (workdir / RESULT_FILE).exists()


def test_verbose_shows_the_traceback(cli, workdir):
    from cogvlm2 import CogVLM2Error
    with pytest.raises(CogVLM2Error, match="config file not found"):
        cli.main(["--config", "none.yaml", "--predict_data", VIDEO, PROMPT, "--modal_type", "video", "text",
                  "--verbose"])


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupt_exits_130_without_a_result_file(workdir, signal_name):
    """Ctrl-C (or SIGTERM) while generating: an 'interrupted' line, exit code 130, no result file."""
    import signal
    import select
    proc = subprocess.Popen(
        [sys.executable, RUN_PREDICT, "--config", TINY_YAML, "--load_checkpoint", TINY, "--predict_data", PROMPT,
         "--max_new_tokens", "2000"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = ""
    try:
        # wait until the model is loaded and decoding. os.read on the pipe, not readline: a buffered
        # readline can hold "generating" already while select waits for the next write, which comes
        # only when the answer is done (then the signal lands after the handler is gone: exit -15)
        while "generating" not in seen:
            ready, _, _ = select.select([proc.stderr], [], [], 120)
            assert ready, f"no progress within 120 s: {seen!r}"
            chunk = os.read(proc.stderr.fileno(), 65536)
            assert chunk, f"run_predict.py ended early: {seen!r}"
            seen += chunk.decode("utf-8", "replace")
        proc.send_signal(getattr(signal, signal_name))
        _, err = proc.communicate(timeout=60)
        err = err.decode("utf-8", "replace")
    finally:
        proc.kill()
    assert proc.returncode == 130, seen + err
    assert err.strip().endswith("interrupted (no result file written)") and "Traceback" not in err, err
    assert not (workdir / RESULT_FILE).exists()


def test_jsonl_output_keeps_answers_with_newlines_apart(cli, capsys, workdir, meta):
    argv = ["--config", TINY_YAML, "--load_checkpoint", TINY, "--predict_data", VIDEO, PROMPT, PROMPT,
            "--modal_type", "video", "text", "text", "--max_new_tokens", "6", "--output_format", "jsonl"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == [0, 1] and len(lines) == 2
    from cogvlm2 import CogVLM2Tokenizer
    decode = CogVLM2Tokenizer().decode
    assert records[0]["answer"] == decode(meta["gen_new_tokens"][:6])
    assert records[1]["answer"] == decode(meta["text_gen_new_tokens"][:6])
    assert records[0]["frame_indices"] == [0, 25, 50, 75, 100, 125] and records[0]["prompt_tokens"] == 412
    assert records[1]["media"] is None and records[1]["new_tokens"] == 6


def test_the_result_file_is_replaced_whole(cli, capsys, workdir):
    """Written to a temporary file and renamed: an old result is never mixed with a new one."""
    (workdir / RESULT_FILE).write_text("x" * 10000, encoding="utf-8")
    assert cli.main(["--config", TINY_YAML, "--load_checkpoint", TINY, "--predict_data", PROMPT,
                     "--max_new_tokens", "2"]) == 0
    text = (workdir / RESULT_FILE).read_text(encoding="utf-8")
    assert text.startswith("['") and text.endswith("']") and "x" * 100 not in text
    assert [p for p in os.listdir(workdir) if p.startswith(f".{RESULT_FILE}")] == []
