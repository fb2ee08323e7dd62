"""Dataset mode (run_predict.py --predict_data data.jsonl --output_file answers.jsonl): every line gets
its single-run answer (the official model's greedy answer where golden data exists), bad lines are
recorded as errors, the output is in input order; a run killed with SIGKILL resumes to the same file;
two msrun workers give the same file as one process; input errors come before any work."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import cv2
import mindspore as ms
import pytest

from cogvlm2 import CogVLM2Engine, generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PREDICT = os.path.join(REPO, "run_predict.py")
FIXTURES = os.path.join(REPO, "tests", "fixtures")
TINY = os.path.join(FIXTURES, "tiny_chat")
VIDEO = os.path.join(FIXTURES, "bigbuckbunny.mp4")
TINY_YAML = os.path.join(REPO, "configs", "cogvlm2", "predict_cogvlm2_video_tiny.yaml")
PROMPT = "Please describe this video."
HISTORY = [["What animal is shown?", "A big rabbit."]]

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")

# the 12 lines: the fixture video several times, an image, text-only lines, a history line, a corrupt
# video and a missing file; ids given or defaulting to the line number
LINES = [
    {"id": "bunny", "query": PROMPT, "videos": ["clip.mp4"]},
    {"query": PROMPT},                                                                   # id 2
    {"id": "image", "query": "What is in this picture?", "images": ["frame.png"], "max_new_tokens": 9},
    {"id": "history", "query": "What happens next?", "videos": ["clip.mp4"], "history": HISTORY,
     "max_new_tokens": 12},
    {"id": "corrupt", "query": PROMPT, "videos": ["corrupt.mp4"]},
    {"id": "missing", "query": PROMPT, "videos": ["nowhere.mp4"]},
    {"id": "bunny-again", "query": PROMPT, "videos": ["clip.mp4"]},
    {"query": "Hi"},                                                                     # id 8
    {"id": "bunny-subfolder", "query": PROMPT, "videos": ["media/bunny.mp4"]},
    {"id": "short", "query": "What happens?", "videos": ["clip.mp4"], "max_new_tokens": 5},
    {"id": "penalty", "query": PROMPT, "repetition_penalty": 1.3, "max_new_tokens": 10},
    {"id": 99, "query": "Describe the colors.", "videos": ["media/bunny.mp4"], "response": "(a label: ignored)"},
]
GOLDEN_VIDEO_IDS = ("bunny", "bunny-again", "bunny-subfolder")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset")
    shutil.copy(VIDEO, folder / "clip.mp4")
    (folder / "media").mkdir()
    shutil.copy(VIDEO, folder / "media" / "bunny.mp4")
    (folder / "corrupt.mp4").write_bytes(open(VIDEO, "rb").read()[:5000])       # truncated: header only
    import decord  # noqa: F401  (after mindspore, see README)
    frames, _ = __import__("cogvlm2").CogVLM2Processor().load_video(VIDEO)
    cv2.imwrite(str(folder / "frame.png"), cv2.cvtColor(frames[2], cv2.COLOR_RGB2BGR))
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES), encoding="utf-8")
    return path


# every test runs in its own working directory (conftest.py's workdir)
pytestmark = pytest.mark.usefixtures("workdir")


def command(dataset, output, *extra):
    return ["--config", TINY_YAML, "--load_checkpoint", TINY, "--predict_data", str(dataset),
            "--output_file", str(output), *extra]


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def reference(dataset, cli, tmp_path_factory):
    """The uninterrupted single-process run (batch 8: the engine's continuous batching)."""
    output = tmp_path_factory.mktemp("reference") / "answers.jsonl"
    assert cli.main(command(dataset, output, "--predict_batch_size", "8")) == 0
    return records(output)


@pytest.fixture(scope="module")
def engine():
    with CogVLM2Engine.from_pretrained(TINY) as eng:
        yield eng


def single_run(engine, line, folder):
    """The line answered alone by the static generate() path (not the engine's batching)."""
    media = [os.path.join(folder, p) for p in line.get("videos", []) + line.get("images", [])]
    inputs = engine.processor(text=line["query"], video=media[0] if media else None, history=line.get("history"))
    keys = ("input_ids", "token_type_ids", "position_ids", "attention_mask", "pixel_values")
    options = {"max_new_tokens": line.get("max_new_tokens", 20)}           # 20: the tiny YAML's default
    if "repetition_penalty" in line:
        options["repetition_penalty"] = line["repetition_penalty"]
    run = lambda: generate(engine.model, **{k: inputs[k] for k in keys}, **options)  # noqa: E731
    tokens = engine.call_on_model_thread(run).new_tokens[0].tolist()
    return tokens, engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_every_line_gets_its_single_run_answer_in_input_order(reference, dataset, engine, meta, golden):
    assert [row["id"] for row in reference] == ["bunny", 2, "image", "history", "corrupt", "missing",
                                                "bunny-again", 8, "bunny-subfolder", "short", "penalty", 99]
    by_id = {row["id"]: row for row in reference}
    for video_id in GOLDEN_VIDEO_IDS:                     # the official implementation's greedy answer
        row = by_id[video_id]
        assert row["answer"] == meta["gen_decoded"] and row["new_tokens"] == len(golden["gen_new_tokens"])
        assert row["prompt_tokens"] == 412 and row["frames"] == 6
        assert row["frame_indices"] == [0, 25, 50, 75, 100, 125] and row["finish_reason"] == "length"
    assert by_id[2]["answer"] == meta["text_gen_decoded"]
    assert "moov atom" in by_id["corrupt"]["error"] and "corrupt.mp4" in by_id["corrupt"]["error"]
    assert by_id["missing"]["error"].startswith("video file not found") and "nowhere.mp4" in by_id["missing"]["error"]
    assert set(by_id["corrupt"]) == set(by_id["missing"]) == {"id", "error"}
    for line in LINES:
        sample_id = line.get("id", LINES.index(line) + 1)
        if sample_id in GOLDEN_VIDEO_IDS or sample_id in ("corrupt", "missing"):
            continue
        tokens, text = single_run(engine, line, dataset.parent)
        assert by_id[sample_id]["answer"] == text, sample_id
        assert by_id[sample_id]["new_tokens"] == len(tokens), sample_id
    assert by_id["image"]["frames"] == 1 and by_id["history"]["new_tokens"] == 12


def test_rerun_skips_everything_and_overwrite_starts_over(reference, dataset, cli, capsys, workdir):
    output = workdir / "answers.jsonl"
    output.write_text("".join(json.dumps(row) + "\n" for row in reference), encoding="utf-8")
    assert cli.main(command(dataset, output)) == 0
    assert "12 already done" in capsys.readouterr().err and records(output) == reference
    assert cli.main(command(dataset, output, "--overwrite", "--max_new_tokens", "3")) == 0
    assert records(output)[1]["new_tokens"] == 3 and records(output)[1]["answer"] != reference[1]["answer"]
    assert [row["id"] for row in records(output)] == [row["id"] for row in reference]


def test_resume_after_sigkill_equals_an_uninterrupted_run(reference, dataset, cli, workdir):
    output = workdir / "answers.jsonl"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, RUN_PREDICT, *command(dataset, output, "--predict_batch_size", "1")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if output.exists() and output.read_bytes().count(b"\n") >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    written = records(output)
    assert 3 <= len(written) < len(LINES)                     # killed mid-run, in completion order
    with open(output, "ab") as f:                             # what a write cut by a power loss leaves
        f.write(b'{"id": "short", "answer": "half a li')
    assert cli.main(command(dataset, output)) == 0
    final = records(output)
    assert without_seconds(final) == without_seconds(reference)
    assert len({json.dumps(row["id"]) for row in final}) == len(final) == len(LINES)
    assert [row for row in final if row["id"] in {r["id"] for r in written}] == \
        sorted(written, key=lambda row: [r["id"] for r in reference].index(row["id"]))   # kept as written


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_msrun_workers_give_the_single_process_file(reference, dataset, workdir):
    output = workdir / "answers.jsonl"
    env = {**os.environ, "PYTHONPATH": REPO, "GLOG_v": "3"}
    proc = subprocess.run(["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
                           f"--log_dir={workdir / 'msrun_log'}", "--join=True", "--cluster_time_out=120",
                           RUN_PREDICT, *command(dataset, output)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    logs = {name: (workdir / "msrun_log" / name).read_text(errors="replace")
            for name in ("worker_0.log", "worker_1.log")}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + str(logs)
    assert without_seconds(records(output)) == without_seconds(reference)
    assert "rank 0 of 2 takes 6" in logs["worker_0.log"] and "rank 1 of 2 takes 6" in logs["worker_1.log"]
    assert "12 answers in input order in" in logs["worker_0.log"]
    assert sorted(os.listdir(workdir)) == ["answers.jsonl", "msrun_log", "output"] or \
        not [name for name in os.listdir(workdir) if ".rank" in name]     # rank files and markers removed


def test_merge_only_merges_rank_files_in_input_order(reference, dataset, cli, capsys, workdir):
    from cogvlm2.cogvlm2_dataset import rank_file
    output = str(workdir / "answers.jsonl")
    for rank in range(2):                          # rank 1 stopped after two of its samples
        rows = reference[rank::2] if rank == 0 else reference[1::2][:2]
        with open(rank_file(output, rank), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in reversed(rows))
    assert cli.main(command(dataset, output, "--merge_only")) == 0
    err = capsys.readouterr().err
    assert "8 of 12 answers in input order" in err and "4 missing (ids ['missing', 8, 'short', 99])" in err
    assert records(output) == [row for i, row in enumerate(reference) if i % 2 == 0 or i in (1, 3)]
    assert os.path.exists(rank_file(output, 1))                 # kept until every sample is answered


def test_a_media_folder_with_a_prompt(cli, workdir, meta):
    folder = workdir / "videos"
    (folder / "b").mkdir(parents=True)
    shutil.copy(VIDEO, folder / "b" / "second.mp4")
    shutil.copy(VIDEO, folder / "a.mp4")
    (folder / "notes.txt").write_text("not media")
    output = workdir / "captions.jsonl"
    assert cli.main(["--load_checkpoint", TINY, "--predict_data", str(folder), "--prompt", PROMPT,
                     "--output_file", str(output), "--max_new_tokens", "20", "--device_target", "CPU"]) == 0
    rows = records(output)
    assert [row["id"] for row in rows] == ["a.mp4", "b/second.mp4"]
    assert all(row["answer"] == meta["gen_decoded"] for row in rows)


@pytest.mark.parametrize("lines, message", [
    ([{"id": "a", "query": "Q"}, {"id": "a", "query": "Q2"}], "line 2: id 'a' is already the id of line 1"),
    ([{"query": "Q"}, {"id": 1, "query": "Q2"}], "line 2: id 1 is already the id of line 1"),
    ([{"query": "Q", "max_new_token": 5}], "line 1: unknown key(s) ['max_new_token']"),
    ([{"query": "Q", "top_p": 2}], "line 1: top_p must be a number in (0, 1]"),
    ([{"query": "Q", "videos": ["a.mp4", "b.mp4"]}], "\"videos\" must be a list of one path"),
    ([{"videos": ["a.mp4"]}], "\"query\" must be the question as a string"),
    ([{"query": "Q", "history": [["only a question"]]}], "\"history\" must be a list of [question, answer]"),
    ("not json\n", "line 1 is not valid JSON"),
])
def test_bad_input_is_one_line_before_any_work(cli, capsys, workdir, lines, message):
    data = workdir / "bad.jsonl"
    data.write_text(lines if isinstance(lines, str) else "".join(json.dumps(x) + "\n" for x in lines))
    output = workdir / "answers.jsonl"
    assert cli.main(command(data, output)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "loading weights" not in err and not output.exists()


@pytest.mark.parametrize("extra, message", [
    (["--modal_type", "video"], "--modal_type is for single questions"),
    (["--stream"], "--stream is for single questions"),
    (["--overwrite", "--merge_only"], "contradict each other"),
])
def test_dataset_flag_errors(cli, capsys, workdir, dataset, extra, message):
    assert cli.main(command(dataset, workdir / "a.jsonl", *extra)) == 2
    assert message in capsys.readouterr().err


def test_flag_errors_outside_dataset_mode(cli, capsys, workdir):
    assert cli.main(["--load_checkpoint", TINY, "--predict_data", VIDEO, PROMPT, "--modal_type", "video",
                     "text", "--output_file", "a.jsonl"]) == 2
    assert "--output_file is for dataset mode" in capsys.readouterr().err
    assert cli.main(["--predict_data", "data.jsonl", "--output_file", "a.jsonl"]) == 2
    assert "give --config YAML" in capsys.readouterr().err
    assert cli.main(["--load_checkpoint", TINY, "--predict_data", "none.jsonl", "--output_file", "a.jsonl"]) == 2
    assert "dataset file not found: 'none.jsonl'" in capsys.readouterr().err


def test_answers_of_another_dataset_are_refused(cli, capsys, workdir, dataset):
    output = workdir / "answers.jsonl"
    output.write_text(json.dumps({"id": "elsewhere", "answer": "x"}) + "\n")
    assert cli.main(command(dataset, output)) == 2
    assert "answer for id 'elsewhere', which is not in the dataset" in capsys.readouterr().err


def test_concurrent_frame_readers_leave_stderr_where_it_was():
    """The engine decodes videos in several threads; each read captures fd 2 for ffmpeg's messages.
    Overlapping captures must restore fd 2 to the original file, not to another thread's capture."""
    from cogvlm2.cogvlm2_video_io import _NativeStderr
    before = os.fstat(2).st_ino
    start = threading.Barrier(4)

    def read():
        start.wait()
        for _ in range(50):
            with _NativeStderr():
                time.sleep(0.0005)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert os.fstat(2).st_ino == before
