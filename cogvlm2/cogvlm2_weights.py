"""Checkpoint reading and writing, name mapping and the strict checks every loader applies.

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
import struct
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from cogvlm2.cogvlm2_errors import CheckpointError

__all__ = ["CheckpointError", "HF_INDEX", "MS_INDEX", "hf_to_ms_name", "read_safetensors",
           "checkpoint_files", "iter_checkpoint", "checkpoint_layout", "transposed_parameters", "to_model_layout",
           "is_converted_dir", "read_safetensors_raw", "write_safetensors", "encode_tensor", "check_tensor",
           "check_complete", "convert_weight_dict", "check_parameters_loaded", "bfloat16_values", "parameter_tensor",
           "parameter_values", "random_tensor"]

HF_INDEX = "model.safetensors.index.json"
MS_INDEX = "mindspore_model.index.json"    # marks a directory written by convert_checkpoint
SKIPPED_TENSORS = re.compile(r"\.rotary_emb\.inv_freq$")

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32}


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


def bfloat16_values(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 values (as float32), as a bf16 checkpoint holds them."""
    return _bf16_to_fp32(_fp32_to_bf16(values))


# ----- values <-> parameters (a Linear weight may be kept as bfloat16 bits: cogvlm2_layers.parameter_dtype) --

_CHUNK = 1 << 22      # values per pass of a conversion, so its temporaries stay small beside the tensor


def _exact_bits(values: np.ndarray, name: str, source: str) -> np.ndarray:
    """float32 values -> their bfloat16 bits, chunk by chunk (small temporaries), only if every value is a
    bfloat16 value: a CheckpointError naming the tensor otherwise."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    bits = np.empty(flat.shape, np.uint16)
    for start in range(0, flat.size, _CHUNK):
        words = flat[start:start + _CHUNK].view(np.uint32)
        if np.any(words & 0xFFFF):
            raise CheckpointError(f"{name} in {source} holds float32 values that bfloat16 would round; load it "
                                  "with model_config param_init_type: float32 (bfloat16 keeps a bf16 "
                                  "checkpoint's weights)")
        bits[start:start + words.size] = words >> 16
    return bits.reshape(np.shape(values))


def parameter_tensor(param, stored: np.ndarray, source: str, st_dtype: str = "F32"):
    """A checkpoint tensor (model layout; ``st_dtype`` "BF16": its uint16 bits, else float values) -> the
    Tensor ``param`` keeps it in. Into bfloat16 bits as they are from a bf16 checkpoint, from float values
    only if each is a bfloat16 value: a CheckpointError naming the tensor otherwise, never a rounding."""
    from mindspore import Tensor
    from cogvlm2.cogvlm2_layers import BF16_BITS
    if param.dtype == BF16_BITS:
        if st_dtype == "BF16":
            return Tensor(np.ascontiguousarray(stored, dtype=np.uint16))
        return Tensor(_exact_bits(stored, param.name, source))
    values = _bf16_to_fp32(stored) if st_dtype == "BF16" else stored
    return Tensor(np.ascontiguousarray(values), dtype=param.dtype)


def parameter_values(param) -> np.ndarray:
    """A parameter's values as float32 (bfloat16 bits widened)."""
    from cogvlm2.cogvlm2_layers import BF16_BITS
    array = param.asnumpy()
    return _bf16_to_fp32(array) if param.dtype == BF16_BITS else array.astype(np.float32)


def random_tensor(param, rng: np.random.Generator, scale: float):
    """N(0, scale^2) values for ``param`` (rounded to bfloat16 for one kept as its bits, drawn chunk by chunk
    so no float32 copy of it is made) as a Tensor."""
    from mindspore import Tensor
    from cogvlm2.cogvlm2_layers import BF16_BITS
    if param.dtype != BF16_BITS:
        values = rng.standard_normal(param.shape, dtype=np.float32)
        values *= scale
        return Tensor.from_numpy(values)
    bits = np.empty(int(np.prod(param.shape)), np.uint16)
    for start in range(0, bits.size, _CHUNK):
        values = rng.standard_normal(min(_CHUNK, bits.size - start), dtype=np.float32)
        values *= scale
        bits[start:start + values.size] = _fp32_to_bf16(values)
    return Tensor.from_numpy(bits.reshape(param.shape))


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


def iter_checkpoint(directory: str) -> Iterator[Tuple[str, str, str, np.ndarray]]:
    """Yield (shard path, model parameter name, safetensors dtype, stored array: ``read_safetensors_raw``)
    for every parameter tensor of a checkpoint, in the checkpoint's layout: a HF directory holds PyTorch
    (out, in) Linear weights, a converted directory holds the model's own layout."""
    for path in checkpoint_files(directory):
        for name, st_dtype, array in read_safetensors_raw(path):
            ms_name = hf_to_ms_name(name)
            if ms_name is not None:
                yield path, ms_name, st_dtype, array


# ----- checks -----------------------------------------------------------------------------------

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



# ----- strict loading in mindformers' Trainer flow -----------------------------------------------
# MultiModalToTextGenerationTrainer builds the network without initial values, loads the checkpoint
# with mindspore.load_param_into_net (HF directories through the model's convert_weight_dict), then
# calls init_parameters_data, which would silently fill missing weights with random values.

def convert_weight_dict(model, source_dict: Dict[str, object]) -> Dict[str, object]:
    """The tensors mindformers read from a HF directory -> the model's parameters, strictly: an
    unknown tensor or a wrong shape is a CheckpointError (missing ones are caught after loading).
    Linear weights are transposed from the PyTorch (out, in) layout to the model's (in, out)."""
    import mindspore as ms
    from mindspore import Parameter, ops
    from cogvlm2.cogvlm2_layers import BF16_BITS
    layout = checkpoint_layout(model)
    expected = {name: shape for name, (shape, _) in layout.items()}
    params = dict(model.parameters_and_names())
    converted = {}
    for name, value in source_dict.items():
        target = hf_to_ms_name(name)
        if target is None:
            continue
        check_tensor(target, tuple(value.shape), expected, "load_checkpoint")
        if params[target].dtype == BF16_BITS:                   # kept as bfloat16 bits: from the values, exactly
            array = to_model_layout(value.astype(ms.float32).asnumpy(), layout[target][1])
            value = Parameter(parameter_tensor(params[target], array, "load_checkpoint"), name=target)
        elif layout[target][1]:
            value = Parameter(ops.transpose(value, (1, 0)).contiguous(), name=target)
        converted[target] = value
    return converted


def check_parameters_loaded(model):
    """Raise a CheckpointError if a parameter was never given a value (built under
    ``no_init_parameters``, whatever is still uninitialised was missing from the checkpoint)."""
    params = list(model.get_parameters())
    missing = [p.name for p in params if p.has_init]
    if missing:
        raise CheckpointError(
            f"load_checkpoint: {len(missing)} of {len(params)} parameters are not in the checkpoint, "
            f"first {missing[0]}. Is it a CogVLM2-Video checkpoint for this config? Give a HF "
            "directory (config.json + model.safetensors.index.json + shards) or the output of "
            "tools/convert_weight.py, and load_ckpt_format: safetensors")
