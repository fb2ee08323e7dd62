"""Checkpoint reading, name mapping and conversion (HF safetensors -> MindSpore checkpoint directory).

The model's parameter names are the HF checkpoint's names, so the mapping is the identity except for
tensors that are not parameters (``rotary_emb.inv_freq``, recomputed from the config). Tensors are
read one at a time through a memory map, so neither loading nor converting ever holds a whole model
twice.

safetensors files are read and written here (the documented 8-byte header + JSON layout, with
``numpy.memmap``) because the ``safetensors`` package's numpy API has no bfloat16, the dtype of every
CogVLM2 checkpoint, and ``mindspore.save_checkpoint`` needs a whole file's tensors in memory at once.
"""
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

__all__ = ["CheckpointError", "HF_INDEX", "MS_INDEX", "hf_to_ms_name", "read_safetensors",
           "checkpoint_files", "iter_checkpoint", "expected_shapes", "expected_layout", "checkpoint_layout",
           "transposed_parameters", "to_model_layout", "convert_checkpoint", "is_converted_dir",
           "read_safetensors_raw", "write_safetensors", "encode_tensor"]

HF_INDEX = "model.safetensors.index.json"
MS_INDEX = "mindspore_model.index.json"    # marks a directory written by convert_checkpoint
SKIPPED_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the file, the tensor and the fix."""


def hf_to_ms_name(name: str) -> Optional[str]:
    """HF tensor name -> model parameter name; None for tensors that are not parameters."""
    if SKIPPED_TENSORS.search(name):
        return None
    return name


def transposed_parameters(model) -> set:
    """Names of the parameters stored transposed relative to the PyTorch checkpoint (``Linear``
    weights, kept (in, out) for the CPU MatMul)."""
    names = set()
    for prefix, cell in model.cells_and_names():
        for attr in getattr(cell, "transposed_in_checkpoint", ()):
            names.add(f"{prefix}.{attr}" if prefix else attr)
    return names


def checkpoint_layout(model) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """{parameter name: (shape in a HF checkpoint, transposed in the model?)}."""
    transposed = transposed_parameters(model)
    layout = {}
    for name, param in model.parameters_and_names():
        shape = tuple(param.shape)
        layout[name] = (shape[::-1] if name in transposed else shape, name in transposed)
    return layout


def to_model_layout(array: np.ndarray, transposed: bool) -> np.ndarray:
    return np.ascontiguousarray(array.T if transposed else array)


# ----- reading and writing safetensors -----------------------------------------------------------

def _bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def read_safetensors_raw(path: str) -> Iterator[Tuple[str, str, np.ndarray]]:
    """Yield (name, safetensors dtype, stored array) for each tensor: views into a memory map, so
    nothing is read until used (bfloat16 comes as its uint16 bits)."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); re-download it") from err
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.shape[0]:
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file (truncated?); "
                                  "re-download it")
        yield name, info["dtype"], data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def read_safetensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (name, float32/float16 array) for each tensor of a safetensors file, one at a time."""
    for name, st_dtype, array in read_safetensors_raw(path):
        yield name, _bf16_to_fp32(array) if st_dtype == "BF16" else array


def write_safetensors(path: str, entries):
    """Write a safetensors file tensor by tensor. entries: (name, dtype "F32"/"F16"/"BF16", shape,
    make) where make() returns the tensor's array (uint16 bits for BF16) when its turn comes, so
    only one tensor is in memory at a time."""
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}
    header, offset = {"__metadata__": {"format": "ms"}}, 0
    for name, st_dtype, shape, _ in entries:
        size = int(np.prod(shape)) * itemsize[st_dtype]
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                                   # 8-byte aligned data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, _, shape, make in entries:
            array = np.ascontiguousarray(make())
            if array.shape != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name} came out as {array.shape}, expected {tuple(shape)}")
            f.write(memoryview(array).cast("B"))


def encode_tensor(array: np.ndarray, st_dtype: str, transpose: bool, target: str) -> np.ndarray:
    """A stored checkpoint array -> the model's layout in the target safetensors dtype. bfloat16 to
    bfloat16 moves the bits unchanged."""
    if st_dtype == "BF16" and target == "BF16":
        return to_model_layout(array, transpose)
    values = _bf16_to_fp32(array) if st_dtype == "BF16" else array.astype(np.float32)
    values = to_model_layout(values, transpose)
    if target == "BF16":
        return _fp32_to_bf16(values)
    return values.astype(np.float16 if target == "F16" else np.float32)


def checkpoint_files(directory: str) -> List[str]:
    """The safetensors shards of a HF or converted checkpoint directory, in index order."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory; give the folder holding "
                              "config.json and the *.safetensors shards")
    for index_name in (MS_INDEX, HF_INDEX):
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
            missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
            if missing:
                raise CheckpointError(f"{directory}: shard {missing[0]} listed in {index_name} is missing; "
                                      "download or copy it")
            return [os.path.join(directory, name) for name in files]
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{directory}: no {HF_INDEX}, {MS_INDEX} or model.safetensors; "
                          "this is not a CogVLM2 checkpoint directory")


def is_converted_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MS_INDEX))


def iter_checkpoint(directory: str) -> Iterator[Tuple[str, str, np.ndarray]]:
    """Yield (shard path, model parameter name, array) for every parameter tensor of a checkpoint, in
    the checkpoint's layout: a HF directory holds PyTorch (out, in) Linear weights, a converted
    directory holds the model's own layout."""
    for path in checkpoint_files(directory):
        for name, array in read_safetensors(path):
            ms_name = hf_to_ms_name(name)
            if ms_name is not None:
                yield path, ms_name, array


# ----- the model's expected tensors --------------------------------------------------------------

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


def check_tensor(name: str, shape, expected: Dict[str, Tuple[int, ...]], source: str):
    """Raise a CheckpointError unless ``name`` is a model parameter of shape ``shape``."""
    if name not in expected:
        raise CheckpointError(f"{source}: unknown tensor {name}: the model has no such parameter "
                              "(is this a CogVLM2-Video checkpoint for this config?)")
    if tuple(shape) != expected[name]:
        raise CheckpointError(f"{source}: tensor {name} has shape {tuple(shape)}, the model expects "
                              f"{expected[name]}: the checkpoint and config.json disagree")


def check_complete(seen, expected: Dict[str, Tuple[int, ...]], source: str):
    missing = [name for name in expected if name not in seen]
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} parameter(s), first {missing[0]}; "
                              "the checkpoint is incomplete")


# ----- conversion --------------------------------------------------------------------------------

_TARGETS = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


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


def convert_checkpoint(input_dir: str, output_dir: str, dtype: str = "bf16", overwrite: bool = False,
                       progress=None) -> Dict[str, str]:
    """Convert a HF CogVLM2 checkpoint directory into a MindSpore checkpoint directory.

    One output file per input shard, each written tensor by tensor from a memory map of the input,
    so memory holds about one tensor (plus the input pages the OS keeps cached). Everything is
    written into a temporary directory next to ``output_dir`` and renamed into place at the end, so
    an interrupted run leaves no partial output. Returns the weight map {parameter name: file name}.
    """
    from cogvlm2.cogvlm2_config import CogVLM2Config

    target = _TARGETS.get(dtype)
    if target is None:
        raise CheckpointError(f"--dtype {dtype!r}: use one of {', '.join(_TARGETS)}")
    if not os.path.isdir(input_dir):
        raise CheckpointError(f"{input_dir}: input directory does not exist; give the HF checkpoint folder")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise CheckpointError(f"{output_dir}: output already exists; pass --overwrite to replace it")
    config = CogVLM2Config.from_hf_config(input_dir)
    shards = checkpoint_files(input_dir)
    layout = expected_layout(config)
    expected = {name: shape for name, (shape, _) in layout.items()}

    parent = os.path.dirname(output_dir) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    os.chmod(staging, 0o755)
    weight_map = {}
    try:
        for number, shard in enumerate(progress(shards) if progress else shards, 1):
            out_name = f"mindspore_model-{number:05d}-of-{len(shards):05d}.safetensors"
            _convert_shard(shard, os.path.join(staging, out_name), layout, expected, target, weight_map)
        check_complete(weight_map, expected, input_dir)
        config.save_hf_config(staging)
        with open(os.path.join(staging, MS_INDEX), "w", encoding="utf-8") as f:
            json.dump({"format": "cogvlm2-mindspore", "dtype": dtype, "weight_map": weight_map}, f, indent=1)
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(prefix=".replaced-", dir=parent)
            os.rename(output_dir, os.path.join(old, "out"))
            os.rename(staging, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return weight_map
