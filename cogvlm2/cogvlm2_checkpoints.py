"""What training writes besides adapters: a whole model as a HF-format checkpoint directory (full
fine-tuning's result, the merge tool's output) and resumable training checkpoints (trainable
weights + AdamW state + the step).

Every directory is written into a hidden staging folder beside it and renamed into place, so an
interrupted write leaves no half-written checkpoint.
"""
import json
import os
import re
import shutil
import tempfile
from typing import Dict, Optional

import numpy as np

from cogvlm2.cogvlm2_errors import CheckpointError
from cogvlm2.cogvlm2_weights import (checkpoint_layout, encode_tensor, parameter_tensor, parameter_values,
                                     write_safetensors)

__all__ = ["staged_directory", "save_hf_checkpoint", "save_train_checkpoint", "load_train_checkpoint",
           "latest_train_checkpoint", "STEP_DIR"]

_TARGETS = {"fp32": "F32", "float32": "F32", "fp16": "F16", "float16": "F16", "bf16": "BF16", "bfloat16": "BF16"}
STEP_DIR = re.compile(r"^step_(\d+)$")


class staged_directory:
    """``with staged_directory(path) as tmp:`` write into tmp; on success tmp replaces ``path``."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def __enter__(self) -> str:
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.isdir(self.path):
            old = self.path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        return False


def save_hf_checkpoint(network, directory: str, dtype: str = "bf16"):
    """The network as a HF-format directory (config.json + model.safetensors, PyTorch layout and names)
    that ``from_pretrained``, ``--load_checkpoint`` and the engine load."""
    if dtype not in _TARGETS:
        raise CheckpointError(f"dtype {dtype!r} is not one of {sorted(_TARGETS)}")
    target = _TARGETS[dtype]
    layout = checkpoint_layout(network)
    params = dict(network.parameters_and_names())
    entries = []
    for name in sorted(params):
        if name.endswith(".lora_A") or name.endswith(".lora_B"):
            raise CheckpointError(f"{name}: merge the LoRA layers first (cogvlm2_lora.merge_lora)")
        shape, transposed = layout[name]
        entries.append((name, target, shape,
                        lambda p=params[name], t=transposed: encode_tensor(parameter_values(p), "F32", t, target)))
    hf = network.config.to_hf_dict()
    hf["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[target]
    with staged_directory(directory) as tmp:
        write_safetensors(os.path.join(tmp, "model.safetensors"), entries)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)


def save_train_checkpoint(directory: str, params: Dict[str, np.ndarray], optimizer: Dict[str, np.ndarray],
                          state: dict):
    """``directory``: trainable.safetensors (model layout), optimizer.safetensors, state.json."""
    from safetensors.numpy import save_file
    with staged_directory(directory) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, os.path.join(tmp, "trainable.safetensors"))
        save_file({k: np.ascontiguousarray(v) for k, v in optimizer.items()},
                  os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)


def load_train_checkpoint(directory: str):
    """-> (trainable arrays, optimizer arrays, state dict)."""
    from safetensors.numpy import load_file
    try:
        with open(os.path.join(directory, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        return (load_file(os.path.join(directory, "trainable.safetensors")),
                load_file(os.path.join(directory, "optimizer.safetensors")), state)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read training checkpoint {directory}: {err}") from err


def latest_train_checkpoint(folder: str) -> Optional[str]:
    """The step_N directory with the largest N in ``folder``, or None."""
    if not os.path.isdir(folder):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := STEP_DIR.match(name))]
    return os.path.join(folder, max(steps)[1]) if steps else None


def set_parameters(network, arrays: Dict[str, np.ndarray], source: str):
    """Copy arrays (model layout) into the network's parameters of the same names."""
    params = dict(network.parameters_and_names())
    for name, value in arrays.items():
        if name not in params or tuple(params[name].shape) != tuple(value.shape):
            raise CheckpointError(f"{source}: {name} {tuple(value.shape)} does not fit this model/pet_config")
        params[name].set_data(parameter_tensor(params[name], value, source))
