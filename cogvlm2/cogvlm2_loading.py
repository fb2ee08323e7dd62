"""Build the network and the processor from a mindformers YAML or from a checkpoint directory.

The one place that turns a config into a loaded model: ``CogVLM2Engine.from_config`` /
``from_pretrained``, run_predict.py, the server and the dataset job all come through here.

- ``read_yaml(path)``: the YAML as a ``MindFormerConfig``, with one clear error for a missing,
  unreadable, empty or non-mapping file, or one without ``model.model_config``.
- ``build_from_yaml(path, load_checkpoint=None, **model_overrides)``: (network, processor, yaml).
  A YAML without a checkpoint is refused (naming ``load_checkpoint``) unless ``random_weights=True``
  (benchmarks only): the network never runs on placeholder weights by accident.
- ``build_from_pretrained(path, **overrides)``: (network, processor) from a HF or converted directory;
  template, frame count and sizes come from its config.json.
"""
import copy
import os

from cogvlm2.cogvlm2 import CogVLM2ForVideo
from cogvlm2.cogvlm2_config import CogVLM2Config
from cogvlm2.cogvlm2_errors import CheckpointError, CogVLM2ConfigError
from cogvlm2.cogvlm2_processor import CogVLM2Processor
from cogvlm2.cogvlm2_weights import check_parameters_loaded, checkpoint_files, random_tensor

__all__ = ["read_yaml", "build_from_yaml", "build_from_pretrained", "check_checkpoint", "fill_random_weights",
           "apply_context", "CONTEXT_KEYS"]

# from_config overrides that belong to the YAML's context: section, not to model_config
CONTEXT_KEYS = ("device_target", "device_id")
_context_built = False

# sizes a checkpoint's config.json and a YAML must agree on
_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_multi_query_heads")
_VISION_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_heads")


def read_yaml(path: str):
    """The YAML config at ``path`` (a mindformers ``MindFormerConfig``)."""
    if not os.path.isfile(path):
        raise CogVLM2ConfigError(f"config file not found: {path!r} (relative to {os.getcwd()}); use e.g. "
                                 "configs/cogvlm2/predict_cogvlm2_video_tiny.yaml")
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as err:
        raise CogVLM2ConfigError(f"cannot read config {path!r}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise CogVLM2ConfigError(f"config {path!r} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}, not a mapping of keys"
        raise CogVLM2ConfigError(f"config {path!r} is {kind}; a CogVLM2 YAML has model:, processor:, context: "
                                 "sections (see configs/cogvlm2/)")
    from mindformers.tools.register import MindFormerConfig
    config = MindFormerConfig(os.path.realpath(path))
    if not config.model or not config.model.model_config:
        raise CogVLM2ConfigError(f"{path!r} has no model.model_config section: is it a CogVLM2 config?")
    return config


def check_checkpoint(directory: str, model_config: CogVLM2Config, source: str):
    """Fail before building the network if ``directory`` is missing, not a CogVLM2 checkpoint, or
    holds a model of other sizes than ``model_config``."""
    if not os.path.exists(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory!r} (relative to {os.getcwd()}); "
                              "pass --load_checkpoint DIR")
    checkpoint_files(directory)      # a CheckpointError unless it holds an index or model.safetensors
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return                       # nothing more to compare; loading checks every tensor
    saved = CogVLM2Config.from_hf_config(directory).to_hf_dict()
    wanted = model_config.to_hf_dict()
    differ = [f"{k} {saved[k]} vs {wanted[k]}" for k in _SIZE_KEYS if saved[k] != wanted[k]]
    differ += [f"vision {k} {saved['vision_config'][k]} vs {wanted['vision_config'][k]}"
               for k in _VISION_SIZE_KEYS if saved["vision_config"][k] != wanted["vision_config"][k]]
    if differ:
        raise CheckpointError(f"{directory}: the checkpoint does not fit {source} (checkpoint vs config: "
                              f"{'; '.join(differ)}); use the config made for this checkpoint")


def _model_config(yaml_config, overrides) -> CogVLM2Config:
    from mindformers.models.build_config import build_model_config
    section = copy.deepcopy(yaml_config.model.model_config)
    for key, value in overrides.items():
        section[key] = value
    config = build_model_config(section)       # resolves the YAML's type: and spellings
    if not isinstance(config, CogVLM2Config):
        raise CogVLM2ConfigError(f"model.model_config type {type(config).__name__} is not CogVLM2Config")
    return config


def _processor(yaml_config, model_config: CogVLM2Config) -> CogVLM2Processor:
    from mindformers.models.build_processor import build_processor
    section = copy.deepcopy(yaml_config.processor) if yaml_config.processor else None
    if section:
        section.pop("auto_register", None)     # run_mindformer.py's import hook; the plugin is imported
        if section.get("tokenizer"):
            section.tokenizer.pop("auto_register", None)
        processor = build_processor(section)
    else:
        processor = CogVLM2Processor()
    processor.apply_model_config(model_config)
    return processor


def apply_context(yaml_config):
    """MindSpore's context from the YAML (mindformers' ``build_context``), once per process."""
    global _context_built
    if _context_built:
        return
    from mindformers.core.context import build_context
    from mindformers.utils.file_utils import set_output_path
    set_output_path(yaml_config.output_dir)
    build_context(yaml_config)
    _context_built = True


def build_from_yaml(path, load_checkpoint=None, random_weights: bool = False, set_context: bool = True,
                    **overrides):
    """(network, processor, yaml config) from a mindformers YAML (a path, or a ``MindFormerConfig``
    already read, as mindformers' Trainer holds it). ``load_checkpoint`` overrides the YAML's;
    ``device_target``/``device_id`` override its context; every other override is a
    ``model.model_config`` key (e.g. max_batch_size, max_new_tokens). ``set_context=False``: the
    caller (mindformers' run_mindformer.py) has built MindSpore's context already."""
    yaml_config = read_yaml(path) if isinstance(path, (str, os.PathLike)) else path
    if not set_context:
        global _context_built
        _context_built = True
    if load_checkpoint is not None:
        yaml_config.load_checkpoint = load_checkpoint
    for key in CONTEXT_KEYS:
        value = overrides.pop(key, None)
        if value is not None:
            yaml_config.context[key] = value
    model_overrides = {k: v for k, v in overrides.items() if v is not None}
    config = _model_config(yaml_config, model_overrides)
    checkpoint = yaml_config.load_checkpoint
    if not checkpoint and not random_weights:
        raise CheckpointError(f"no checkpoint: {path!r} sets no load_checkpoint; pass --load_checkpoint DIR "
                              "(a HF download of THUDM/cogvlm2-video-llama3-chat or a tools/convert_weight.py "
                              "output). The network never runs on placeholder weights")
    if checkpoint:
        check_checkpoint(checkpoint, config, path)
    processor = _processor(yaml_config, config)
    apply_context(yaml_config)
    from mindspore.nn.utils import no_init_parameters
    with no_init_parameters():
        model = CogVLM2ForVideo(config)
    if checkpoint:
        model.load_weights(checkpoint)
        check_parameters_loaded(model)
    else:
        fill_random_weights(model)
    return model, processor, yaml_config


def build_from_pretrained(path: str, **config_overrides):
    """(network, processor) from a HF or converted checkpoint directory and its config.json."""
    model = CogVLM2ForVideo.from_pretrained(path, **config_overrides)
    processor = CogVLM2Processor()
    processor.apply_model_config(model.config)
    return model, processor


def fill_random_weights(model, seed: int = 0, scale: float = 0.02):
    """Fill every parameter with N(0, scale^2) values, one parameter at a time and without extra
    copies (peak memory stays near the weight bytes): for speed benchmarks, never for answers."""
    import numpy as np
    rng = np.random.default_rng(seed)
    for _, param in model.parameters_and_names():
        param.set_data(random_tensor(param, rng, scale))      # bfloat16 weights: rounded to bfloat16
