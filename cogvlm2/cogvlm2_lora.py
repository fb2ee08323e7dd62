"""LoRA for CogVLM2 with peft's semantics and peft's adapter files.

- ``LoraConfig``: the YAML's ``pet_config`` (mindformers' spelling: ``pet_type: lora``, ``lora_rank``,
  ``lora_alpha``, ``lora_dropout``, ``target_modules``) or peft's ``adapter_config.json`` (``r``, ...).
  ``target_modules`` is a list of names (a module matches when its path equals one or ends with
  ``.name``, as in peft) or one regular expression string (full match of the path, as in peft and
  mindformers).
- ``apply_lora(network, config)``: replaces every matched ``Linear`` with a ``LoRALinear`` that keeps
  the base ``weight`` (same parameter name, so checkpoints still load) and adds ``lora_A`` / ``lora_B``;
  y = x W + (alpha / r) * B(A(dropout(x))). Matching nothing is an error naming the targets.
- ``save_adapter`` / ``load_adapter``: ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's
  names (``base_model.model.<path>.lora_A.weight``) and PyTorch layout: A (r, in), B (out, r). The
  model stores A (in, r) and B (r, out) (the ``Linear`` layout, see ``cogvlm2_layers``).
- ``merge_lora(network)``: W += scaling * A B in place, then back to plain ``Linear`` cells.
"""
import json
import math
import os
import re
import shutil
import tempfile
from typing import Dict, List, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from cogvlm2.cogvlm2_errors import CheckpointError, CogVLM2ConfigError
from cogvlm2.cogvlm2_layers import Linear, widened

__all__ = ["LoraConfig", "LoRALinear", "apply_lora", "kaiming_uniform_a", "lora_parameters", "save_adapter", "load_adapter",
           "read_adapter_config", "merge_lora", "PEFT_PREFIX", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraConfig:
    """rank, alpha, dropout and target modules of a LoRA adapter."""

    def __init__(self, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 target_modules: Union[str, List[str]] = ("language_expert_query_key_value", "language_expert_dense")):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise CogVLM2ConfigError(f"pet_config lora_rank must be a positive integer, got {rank!r}")
        if not 0 <= float(dropout) < 1:
            raise CogVLM2ConfigError(f"pet_config lora_dropout must be in [0, 1), got {dropout!r}")
        if not target_modules:
            raise CogVLM2ConfigError("pet_config target_modules is empty; e.g. "
                                     "[language_expert_query_key_value, language_expert_dense]")
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.target_modules = target_modules if isinstance(target_modules, str) else sorted(target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_pet_config(cls, pet_config) -> "LoraConfig":
        """From the YAML's ``model.model_config.pet_config`` (or a plain dict)."""
        section = dict(pet_config)
        pet_type = str(section.pop("pet_type", "lora")).lower()
        if pet_type != "lora":
            raise CogVLM2ConfigError(f"pet_config pet_type {pet_type!r} is not supported; use pet_type: lora")
        known = {"lora_rank", "lora_alpha", "lora_dropout", "target_modules", "type"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise CogVLM2ConfigError(f"pet_config has unknown keys {unknown}; known: {sorted(known)}")
        targets = section.get("target_modules", ["language_expert_query_key_value", "language_expert_dense"])
        return cls(int(section.get("lora_rank", 8)), section.get("lora_alpha", 16), section.get("lora_dropout", 0.0),
                   targets if isinstance(targets, str) else list(targets))

    def matches(self, path: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, path) is not None
        return any(path == t or path.endswith("." + t) for t in self.target_modules)

    def describe(self) -> str:
        return f"r {self.rank}, alpha {self.alpha:g}, targets {self.target_modules}"


class LoRALinear(nn.Cell):
    """A ``Linear`` plus a low-rank update: x W (+ b) + scaling * (dropout(x) A) B.

    weight (in, out) and bias are the base layer's Parameters (frozen for LoRA training);
    lora_A (in, r) starts random, lora_B (r, out) at zero unless loaded.
    """

    transposed_in_checkpoint = ("weight", "lora_A", "lora_B")

    def __init__(self, base: Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        in_features, out_features = base.weight.shape
        self.out_features = out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scaling = alpha / rank
        self.widen = base.widen                                          # a weight kept as bfloat16 bits
        dtype = ms.float32 if base.widen is not None else base.weight.dtype
        self.lora_A = Parameter(Tensor(np.zeros((in_features, rank), np.float32), dtype), name="lora_A")
        self.lora_B = Parameter(Tensor(np.zeros((rank, out_features), np.float32), dtype), name="lora_B")
        self.use_dropout = dropout > 0
        self.dropout = nn.Dropout(p=dropout) if self.use_dropout else None
        self.matmul = ops.MatMul()

    def construct(self, x, matmul=None):
        if x.ndim == 2:
            return self._forward(x, matmul)
        shape = x.shape
        return self._forward(x.reshape(-1, shape[-1]), matmul).reshape(shape[:-1] + (self.out_features,))

    def _forward(self, x, matmul):
        if matmul is None:                                               # as Linear: the base product
            y = self.matmul(x, widened(self.weight, self.widen, x))      # (N, out)
        else:
            y = matmul(x, self.weight)
        if self.bias is not None:
            y = ops.bias_add(y, self.bias)
        h = self.dropout(x) if self.use_dropout else x
        update = self.matmul(self.matmul(h, self.lora_A), self.lora_B)   # (N, r) -> (N, out)
        return y + update * self.scaling


def _linear_cells(network):
    return [(path, cell) for path, cell in network.cells_and_names() if isinstance(cell, (Linear, LoRALinear))]


def apply_lora(network, config: LoraConfig) -> List[str]:
    """Wrap every matched Linear of ``network`` (a CogVLM2ForVideo) in a LoRALinear; return their paths.
    Initialised as peft's default (``init_lora_weights=True``): lora_A kaiming-uniform with a = sqrt(5),
    i.e. U(-1/sqrt(in), 1/sqrt(in)) (seeded by mindspore.set_seed; numpy's generator, not torch's),
    lora_B zero, so the adapted model equals the base model until trained."""
    matched = [(path, cell) for path, cell in _linear_cells(network)
               if isinstance(cell, Linear) and path != "lm_head" and config.matches(path)]
    if not matched:
        raise CogVLM2ConfigError(f"pet_config target_modules {config.target_modules} match no linear layer of "
                                 "the model; use names such as language_expert_query_key_value, "
                                 "language_expert_dense, gate_proj, up_proj, down_proj, query_key_value")
    cells = dict(network.cells_and_names())
    rng = np.random.default_rng(ms.get_seed() or 0)
    for path, base in matched:
        parent_path, _, attr = path.rpartition(".")
        lora = LoRALinear(base, config.rank, config.alpha, config.dropout)
        lora.lora_A.set_data(Tensor(kaiming_uniform_a(rng, lora.lora_A.shape), lora.lora_A.dtype))
        setattr(cells[parent_path], attr, lora)
    _rename_parameters(network)
    return [path for path, _ in matched]


def kaiming_uniform_a(rng, shape, a: float = math.sqrt(5)) -> np.ndarray:
    """torch.nn.init.kaiming_uniform_(w, a) for a LoRA A stored (in, r): fan_in = in = shape[0];
    bound = sqrt(2 / (1 + a^2)) * sqrt(3 / fan_in) (= 1/sqrt(fan_in) for a = sqrt(5))."""
    fan_in = shape[0]
    bound = math.sqrt(2.0 / (1 + a * a)) * math.sqrt(3.0 / fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _rename_parameters(network):
    """Give every parameter its full path as name (new LoRA parameters are born with short names)."""
    for name, param in network.parameters_and_names():
        param.name = name


def lora_parameters(network) -> Dict[str, Parameter]:
    """{model path of lora_A / lora_B: Parameter}, sorted by name."""
    return dict(sorted((name, p) for name, p in network.parameters_and_names()
                       if name.endswith(".lora_A") or name.endswith(".lora_B")))


def _peft_name(path: str) -> str:
    return f"{PEFT_PREFIX}{path}.weight"


def _peft_config(config: LoraConfig) -> dict:
    """peft 0.13's LoraConfig keys (what ``LoraConfig.save_pretrained`` writes)."""
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "", "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": config.alpha if not float(config.alpha).is_integer() else int(config.alpha),
        "lora_dropout": config.dropout, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "peft_type": "LORA", "r": config.rank, "rank_pattern": {}, "revision": None,
        "target_modules": config.target_modules, "task_type": None, "use_dora": False, "use_rslora": False,
    }


def save_adapter(network, config: LoraConfig, directory: str):
    """Write ``directory/adapter_config.json`` + ``adapter_model.safetensors`` (float32) as peft does;
    written into a temporary folder and renamed, so an interrupted save leaves nothing half-written."""
    from safetensors.numpy import save_file
    tensors = {_peft_name(path): np.ascontiguousarray(param.asnumpy().astype(np.float32).T)   # peft layout
               for path, param in lora_parameters(network).items()}
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(_peft_config(config), f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter_config(directory: str) -> LoraConfig:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {ADAPTER_CONFIG} in adapter directory {directory!r}: pass a directory written "
                              "by peft, ms-swift or run_finetune.py")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    for key, unsupported in (("use_dora", True), ("use_rslora", True), ("fan_in_fan_out", True)):
        if raw.get(key) is unsupported:
            raise CheckpointError(f"{path}: {key} true is not supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise CheckpointError(f"{path}: rank_pattern/alpha_pattern are not supported")
    targets = raw.get("target_modules")
    return LoraConfig(int(raw["r"]), raw.get("lora_alpha", 8), raw.get("lora_dropout", 0.0),
                      targets if isinstance(targets, str) else list(targets or []))


def load_adapter(network, directory: str, expected: LoraConfig = None) -> LoraConfig:
    """Load a peft adapter into a network. If the network has no LoRA layers yet they are created
    from the adapter's config; if ``expected`` (the YAML's pet_config) is given, a different rank,
    alpha or target list is a CheckpointError. Every LoRA tensor must be present with its shape."""
    config = read_adapter_config(directory)
    if expected is not None:
        differ = [f"{k} {getattr(config, k)} vs {getattr(expected, k)}" for k in ("rank", "alpha", "target_modules")
                  if getattr(config, k) != getattr(expected, k)]
        if differ:
            raise CheckpointError(f"adapter {directory} does not fit pet_config (adapter vs config: "
                                  f"{'; '.join(differ)}); use the config the adapter was trained with")
    if not lora_parameters(network):
        apply_lora(network, config)
    params = lora_parameters(network)
    wanted = {_peft_name(path): path for path in params}
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {ADAPTER_WEIGHTS} in adapter directory {directory!r}")
    from safetensors.numpy import load_file
    try:
        stored = load_file(path)
    except Exception as err:   # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"cannot read {path}: {err}") from err
    seen = set()
    for name, array in sorted(stored.items()):
        if name not in wanted:
            raise CheckpointError(f"{path}: tensor {name!r} is not a LoRA weight of this model "
                                  f"(targets {config.target_modules})")
        param = params[wanted[name]]
        value = np.ascontiguousarray(np.asarray(array, np.float32).T)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(array.shape)}, the model needs "
                                  f"{tuple(param.shape)[::-1]} (rank {config.rank})")
        param.set_data(Tensor(value, param.dtype))
        seen.add(name)
    missing = sorted(set(wanted) - seen)
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
    return config


def merge_lora(network):
    """W += scaling * A B for every LoRALinear, which becomes a plain Linear again (in place)."""
    cells = dict(network.cells_and_names())
    for path, cell in list(cells.items()):
        if not isinstance(cell, LoRALinear):
            continue
        if cell.widen is not None:
            raise CogVLM2ConfigError(f"{path}: merging a LoRA adapter into bfloat16 weights would round the sums; "
                                     "build the model with model_config param_init_type: float32 to merge")
        delta = cell.lora_A.asnumpy().astype(np.float32) @ cell.lora_B.asnumpy().astype(np.float32)
        merged = cell.weight.asnumpy().astype(np.float32) + np.float32(cell.scaling) * delta
        in_features, out_features = cell.weight.shape
        base = Linear(in_features, out_features, cell.bias is not None, cell.weight.dtype)
        base.weight = cell.weight
        base.weight.set_data(Tensor(merged, cell.weight.dtype))
        if cell.bias is not None:
            base.bias = cell.bias
        parent_path, _, attr = path.rpartition(".")
        setattr(cells[parent_path], attr, base)
    _rename_parameters(network)
