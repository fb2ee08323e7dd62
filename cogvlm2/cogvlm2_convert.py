"""HF safetensors checkpoint -> MindSpore checkpoint directory (``tools/convert_weight.py``).

One output file per input shard, each written tensor by tensor from a memory map of the input, so
memory holds about one tensor (plus the input pages the OS keeps cached). Everything is written into
a staging directory beside the output (``.NAME.convert-PID``) and renamed into place at the end:
an interrupted run (Ctrl-C, SIGTERM) removes its staging directory, and the next run to the same
output removes what a killed run (kill -9, power loss) left. A read-only location or a full disk is
one CheckpointError line, with nothing left behind.
"""
import errno
import json
import os
import shutil
import signal
import tempfile
from typing import Dict, Tuple

from cogvlm2.cogvlm2_cli import interrupt_on_signals
from cogvlm2.cogvlm2_config import CogVLM2Config
from cogvlm2.cogvlm2_errors import CheckpointError
from cogvlm2.cogvlm2_weights import (MS_INDEX, check_complete, check_tensor, checkpoint_files, checkpoint_layout,
                                     encode_tensor, hf_to_ms_name, is_converted_dir, read_safetensors_raw,
                                     write_safetensors)

__all__ = ["expected_layout", "expected_shapes", "convert_checkpoint"]

_TARGETS = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def expected_layout(config) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """``checkpoint_layout`` of the model ``config`` describes, built without allocating weights."""
    from mindspore.nn.utils import no_init_parameters
    from cogvlm2.cogvlm2 import CogVLM2ForVideo
    with no_init_parameters():
        model = CogVLM2ForVideo(config, compile_graphs=False)
    return checkpoint_layout(model)


def expected_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every parameter name and its shape in a HF checkpoint, without allocating weights."""
    return {name: shape for name, (shape, _) in expected_layout(config).items()}


def _convert_shard(shard: str, out_path: str, layout, expected, target: str, weight_map: Dict[str, str]):
    """One input shard -> one output file in the model's layout, streamed tensor by tensor."""
    entries = []
    for name, st_dtype, array in read_safetensors_raw(shard):
        ms_name = hf_to_ms_name(name)
        if ms_name is None:
            continue
        check_tensor(ms_name, array.shape, expected, os.path.basename(shard))
        if ms_name in weight_map:
            raise CheckpointError(f"{shard}: tensor {name} appears twice in the checkpoint")
        transpose = layout[ms_name][1]
        shape = array.shape[::-1] if transpose else array.shape
        entries.append((ms_name, target, shape,
                        lambda a=array, d=st_dtype, t=transpose: encode_tensor(a, d, t, target)))
        weight_map[ms_name] = os.path.basename(out_path)
    write_safetensors(out_path, entries)


def _staging_prefix(output_dir: str) -> str:
    return f".{os.path.basename(output_dir)}.convert-"


def _remove_stale_staging(parent: str, output_dir: str):
    """Remove the staging directories that earlier runs to this output left (their process is gone)."""
    prefix = _staging_prefix(output_dir)
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _os_error(err: OSError, output_dir: str) -> CheckpointError:
    if err.errno == errno.ENOSPC:
        reason = "the disk is full; free space or choose another --output_path"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "cannot write there (read-only or no permission); choose another --output_path"
    else:
        reason = f"{err.strerror or err}; check --output_path"
    return CheckpointError(f"{output_dir}: {reason} (nothing was written)")


def convert_checkpoint(input_dir: str, output_dir: str, dtype: str = "bf16", overwrite: bool = False,
                       progress=None) -> Dict[str, str]:
    """Convert a HF CogVLM2 checkpoint directory into a MindSpore checkpoint directory.
    Returns the weight map {parameter name: file name}."""
    target = _TARGETS.get(dtype)
    if target is None:
        raise CheckpointError(f"--dtype {dtype!r}: use one of {', '.join(_TARGETS)}")
    if not os.path.isdir(input_dir):
        raise CheckpointError(f"{input_dir}: input directory does not exist; give the HF checkpoint folder")
    if is_converted_dir(input_dir):
        raise CheckpointError(f"{input_dir}: this is already a converted MindSpore checkpoint; load it directly "
                              "(--load_checkpoint or CogVLM2ForVideo.from_pretrained)")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise CheckpointError(f"{output_dir}: output already exists; pass --overwrite to replace it")
    config = CogVLM2Config.from_hf_config(input_dir)
    shards = checkpoint_files(input_dir)
    layout = expected_layout(config)
    expected = {name: shape for name, (shape, _) in layout.items()}

    parent = os.path.dirname(output_dir) or "."
    staging = None
    weight_map = {}
    try:
        with interrupt_on_signals((signal.SIGTERM,)):
            os.makedirs(parent, exist_ok=True)
            _remove_stale_staging(parent, output_dir)
            staging = tempfile.mkdtemp(prefix=f"{_staging_prefix(output_dir)}{os.getpid()}-", dir=parent)
            os.chmod(staging, 0o755)
            for number, shard in enumerate(progress(shards) if progress else shards, 1):
                out_name = f"mindspore_model-{number:05d}-of-{len(shards):05d}.safetensors"
                _convert_shard(shard, os.path.join(staging, out_name), layout, expected, target, weight_map)
            check_complete(weight_map, expected, input_dir)
            config.save_hf_config(staging)
            with open(os.path.join(staging, MS_INDEX), "w", encoding="utf-8") as f:
                json.dump({"format": "cogvlm2-mindspore", "dtype": dtype, "weight_map": weight_map}, f, indent=1)
            _move_into_place(staging, output_dir, parent)
    except OSError as err:
        raise _os_error(err, output_dir) from err
    finally:
        if staging is not None and os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return weight_map


def _move_into_place(staging: str, output_dir: str, parent: str):
    if os.path.exists(output_dir):
        old = tempfile.mkdtemp(prefix=f"{_staging_prefix(output_dir)}{os.getpid()}-replaced-", dir=parent)
        os.rename(output_dir, os.path.join(old, "out"))
        os.rename(staging, output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, output_dir)
