"""Weight converter and loader: the real model's names and shapes, and every refusal."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from cogvlm2 import CogVLM2Config, CogVLM2ForVideo
from cogvlm2.cogvlm2_convert import expected_shapes
from cogvlm2.cogvlm2_weights import HF_INDEX, CheckpointError, hf_to_ms_name, read_safetensors, transposed_parameters

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "tiny_chat")
sys.path.insert(0, os.path.join(os.path.dirname(FIXTURES), "..", "tools"))
import convert_weight  # noqa: E402

SHARD2 = "model-00002-of-00002.safetensors"


def test_real_model_names_and_shapes_without_weights():
    real = json.load(open(os.path.join(FIXTURES, "real_param_shapes.json"), encoding="utf-8"))
    expected = expected_shapes(CogVLM2Config())          # the real config; parameters never allocated
    assert len(real["params"]) == len(expected) == 997
    for name, shape in real["params"].items():
        assert expected[hf_to_ms_name(name)] == tuple(shape), name
    assert sum(int(np.prod(s)) for s in expected.values()) == real["total_params"] == 12_507_530_496
    vision = sum(int(np.prod(s)) for n, s in expected.items() if n.startswith("model.vision."))
    assert vision == real["total_params_vision"] == 4_477_269_248
    assert hf_to_ms_name("model.layers.7.self_attn.rotary_emb.inv_freq") is None


def copy_tiny(tmp_path) -> str:
    target = tmp_path / "hf"
    shutil.copytree(TINY, target)
    for name in os.listdir(target):
        os.chmod(target / name, 0o644)
    return str(target)


def rewrite_shard(directory: str, edit):
    """Rewrite shard 2 as bf16 safetensors after ``edit(dict name -> array)``."""
    path = os.path.join(directory, SHARD2)
    tensors = {name: np.array(array) for name, array in read_safetensors(path)}
    edit(tensors)
    os.remove(path)
    ms.save_checkpoint([{"name": n, "data": Tensor(a).astype(ms.bfloat16)} for n, a in tensors.items()],
                       path, format="safetensors")
    index_path = os.path.join(directory, HF_INDEX)
    index = json.load(open(index_path, encoding="utf-8"))
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != SHARD2}
    index["weight_map"].update({n: SHARD2 for n in tensors})
    json.dump(index, open(index_path, "w", encoding="utf-8"))


def run_cli(capsys, *args):
    code = convert_weight.main(["--model", "cogvlm2", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(capsys, tmp_path, source, *words):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--input_path", source, "--output_path", str(out))
    assert code == 2   # a refusal (bad input), not a crash (1)
    message = [line for line in err if line.startswith("error:")]
    assert len(message) == 1, err
    for word in words:
        assert word in message[0]
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if ".convert-" in p], "staging left behind"


def test_refuses_missing_input_dir(capsys, tmp_path):
    assert_refused(capsys, tmp_path, str(tmp_path / "nope"), "nope", "does not exist")


@pytest.mark.parametrize("verbose", [False, True])
def test_command_line_exit_code_and_traceback(tmp_path, verbose):
    """As a user runs it: a refusal exits with 2 and one line; --verbose shows the traceback."""
    script = os.path.join(os.path.dirname(FIXTURES), "..", "tools", "convert_weight.py")
    argv = [sys.executable, script, "--model", "cogvlm2", "--input_path", str(tmp_path / "nope"),
            "--output_path", str(tmp_path / "out")] + (["--verbose"] if verbose else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                              os.path.dirname(os.path.dirname(FIXTURES)), os.environ.get("PYTHONPATH")]))})
    assert "does not exist" in proc.stderr
    if verbose:   # the exception propagates, with its traceback, as in run_predict.py --verbose
        assert proc.returncode == 1   # Python's code for an uncaught exception
        assert "Traceback (most recent call last)" in proc.stderr and "CheckpointError" in proc.stderr
        assert "convert_checkpoint" in proc.stderr   # the frames of the failing call
    else:
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == \
            [line for line in proc.stderr.splitlines() if "does not exist" in line]


def test_refuses_missing_shard(capsys, tmp_path):
    source = copy_tiny(tmp_path)
    os.remove(os.path.join(source, SHARD2))
    assert_refused(capsys, tmp_path, source, SHARD2, "missing")


def test_refuses_unknown_tensor(capsys, tmp_path):
    source = copy_tiny(tmp_path)
    rewrite_shard(source, lambda t: t.update({"model.vision.extra_head.weight": np.ones((2, 2), np.float32)}))
    assert_refused(capsys, tmp_path, source, "unknown tensor model.vision.extra_head.weight")


def test_refuses_wrong_shape(capsys, tmp_path):
    source = copy_tiny(tmp_path)
    rewrite_shard(source, lambda t: t.update({"model.vision.boi": np.ones((1, 1, 33), np.float32)}))
    assert_refused(capsys, tmp_path, source, "model.vision.boi", "(1, 1, 33)", "(1, 1, 32)")


def test_refuses_missing_tensor(capsys, tmp_path):
    source = copy_tiny(tmp_path)
    rewrite_shard(source, lambda t: t.pop("model.vision.eoi"))
    assert_refused(capsys, tmp_path, source, "missing", "model.vision.eoi")


def test_truncated_shard_leaves_no_output(capsys, tmp_path):
    source = copy_tiny(tmp_path)
    path = os.path.join(source, SHARD2)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    assert_refused(capsys, tmp_path, source, SHARD2, "truncated")


def test_existing_output_needs_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = run_cli(capsys, "--input_path", TINY, "--output_path", str(out))
    assert code == 2 and "--overwrite" in err[-1]
    assert (out / "keep.txt").read_text() == "user data"
    code, _ = run_cli(capsys, "--input_path", TINY, "--output_path", str(out), "--overwrite", "--dtype", "fp32")
    assert code == 0 and not (out / "keep.txt").exists()
    assert json.load(open(out / "mindspore_model.index.json"))["dtype"] == "fp32"
    assert CogVLM2Config.from_hf_config(str(out)).hidden_size == 32


def test_loader_names_the_bad_parameter(tmp_path):
    source = copy_tiny(tmp_path)
    rewrite_shard(source, lambda t: t.update({"model.vision.conv.bias": np.ones((5,), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.vision\.conv\.bias.*\(5,\)"):
        CogVLM2ForVideo.from_pretrained(source)
    source2 = copy_tiny(tmp_path / "b")
    rewrite_shard(source2, lambda t: t.pop("model.vision.conv.bias"))
    with pytest.raises(CheckpointError, match=r"missing 1 parameter.*model\.vision\.conv\.bias"):
        CogVLM2ForVideo.from_pretrained(source2)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_converted_weights_equal_the_checkpoint(tmp_path, capsys, dtype):
    out = tmp_path / dtype
    code, _ = run_cli(capsys, "--input_path", TINY, "--output_path", str(out), "--dtype", dtype)
    assert code == 0
    model = CogVLM2ForVideo.from_pretrained(str(out))
    params = dict(model.parameters_and_names())
    transposed = transposed_parameters(model)
    for shard in ("model-00001-of-00002.safetensors", SHARD2):
        for name, array in read_safetensors(os.path.join(TINY, shard)):
            if name.endswith("inv_freq"):
                continue
            expected = array.T if name in transposed else array
            ours = params[name].asnumpy().astype(np.float32)
            if dtype == "fp16":   # bf16 -> fp16 rounds to 11 significant bits
                np.testing.assert_allclose(ours, expected, rtol=2 ** -11, atol=6e-8)
            else:                 # bf16 values are exact in bf16 and fp32
                assert np.array_equal(ours, expected), name


def test_bf16_rounding_matches_mindspore():
    from cogvlm2.cogvlm2_weights import _bf16_to_fp32, _fp32_to_bf16
    values = np.random.default_rng(0).normal(0, 3, 10000).astype(np.float32)
    values[:4] = [0.0, -0.0, 1.00390625, 1.01171875]      # exact ties round to even
    ours = _bf16_to_fp32(_fp32_to_bf16(values))
    theirs = Tensor(values).astype(ms.bfloat16).astype(ms.float32).asnumpy()
    assert np.array_equal(ours, theirs)


# ----- interrupted or failing conversions leave nothing behind ----------------------------------
def _staging_dirs(folder):
    return [p for p in os.listdir(folder) if ".convert-" in p]


def test_a_killed_runs_staging_directory_is_removed_by_the_next_run(capsys, tmp_path):
    stale = tmp_path / ".out.convert-999999999-abcd"          # as left by kill -9 (no such process)
    stale.mkdir()
    (stale / "mindspore_model-00001-of-00002.safetensors").write_bytes(b"partial" * 1000)
    code, _ = run_cli(capsys, "--input_path", TINY, "--output_path", str(tmp_path / "out"))
    assert code == 0 and (tmp_path / "out" / "mindspore_model.index.json").exists()
    assert _staging_dirs(tmp_path) == []


def test_sigterm_during_conversion_cleans_up(tmp_path):
    import signal
    from cogvlm2.cogvlm2_convert import convert_checkpoint

    def terminate_after_first_shard(shards):
        for number, shard in enumerate(shards):
            if number == 1:
                os.kill(os.getpid(), signal.SIGTERM)            # arrives while converting
            yield shard

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(TINY, str(tmp_path / "out"), progress=terminate_after_first_shard)
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # the handler is restored


@pytest.mark.parametrize("errno_name, words", [("ENOSPC", "the disk is full"),
                                               ("EROFS", "read-only or no permission"),
                                               ("EACCES", "read-only or no permission")])
def test_disk_full_or_read_only_is_one_line(capsys, tmp_path, monkeypatch, errno_name, words):
    import errno
    from cogvlm2 import cogvlm2_convert

    def fail(path, entries):
        code = getattr(errno, errno_name)
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(cogvlm2_convert, "write_safetensors", fail)
    assert_refused(capsys, tmp_path, TINY, str(tmp_path / "out"), words, "nothing was written")


def test_converting_a_converted_directory_says_load_it(capsys, tmp_path):
    converted = tmp_path / "converted"
    assert run_cli(capsys, "--input_path", TINY, "--output_path", str(converted))[0] == 0
    assert_refused(capsys, tmp_path, str(converted), "already a converted MindSpore checkpoint",
                   "load it directly")
