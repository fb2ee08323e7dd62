"""mindformers integration: what the YAML-driven ``Trainer(config).predict(...)`` flow needs.

mindformers 1.8 runs ``run_mindformer.py --run_mode predict --modal_type video text`` through
``MultiModalToTextGenerationTrainer``: it builds the processor and the network from the YAML, loads
the checkpoint, then calls ``pipeline("multi_modal_to_text_generation", model=network, ...)`` whose
steps are ``processor(query_list=...)`` -> ``network.generate(**inputs)`` -> ``processor.post_process``.
Importing this module (``import cogvlm2`` does) makes that flow work for CogVLM2:

- ``register_pipeline_task``: 1.8's ``MindFormerBook`` has no ``multi_modal_to_text_generation``
  entry, so ``pipeline()`` raises KeyError; we add it (pointing at ``cogvlm2_pipeline.yaml``).
- ``CogVLM2VideoPipeline``: the task's pipeline, registered under the task name in place of
  mindformers' ``MultiModalToTextPipeline``, which it extends. For a ``CogVLM2ForVideo`` it drops
  the processor outputs that are not model inputs (``frame_indices``, ``frames_per_sample``),
  takes the generation settings of the YAML ``model_config`` (``max_new_tokens``,
  ``max_decode_length``, ``do_sample``, ``top_k``, ...), and hands ``post_process`` the generated
  ids of each sample. Any other network gets mindformers' stock behaviour.
- strict checkpoint loading: mindformers only *warns* about parameters missing from the checkpoint
  and then fills them with random initial values. ``convert_weight_dict`` (HF directories) and
  ``check_parameters_loaded`` (run by ``CogVLM2ForVideo.init_parameters_data``) raise a
  ``CheckpointError`` instead.

``run_predict.py`` uses the same helpers (``generation_defaults``, ``model_inputs``) without the
Trainer, to show progress and stream the answer.
"""
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
from mindformers.mindformer_book import MindFormerBook
from mindformers.pipeline.multi_modal_to_text_generation_pipeline import MultiModalToTextPipeline
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from cogvlm2 import cogvlm2_weights as weights
from cogvlm2.cogvlm2_weights import CheckpointError

__all__ = ["TASK", "CogVLM2VideoPipeline", "register_pipeline_task", "generation_defaults", "model_inputs",
           "generate_ids", "convert_name", "convert_weight_dict", "check_parameters_loaded"]

TASK = "multi_modal_to_text_generation"
PIPELINE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cogvlm2_pipeline.yaml")

# YAML model_config key -> generation option (mindformers spells the total length max_decode_length)
GENERATION_KEYS = {
    "max_new_tokens": "max_new_tokens",
    "max_decode_length": "max_length",
    "max_length": "max_length",
    "do_sample": "do_sample",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
}

# ----- the predict task --------------------------------------------------------------------------
def register_pipeline_task():
    """Add ``multi_modal_to_text_generation`` to mindformers' pipeline task list (missing in 1.8).

    ``pipeline()`` reads the task's ``common`` YAML even when it is given a built model, to build
    what the caller did not pass (the tokenizer); ours names CogVLM2's. ``get_pipeline_support_task_list``
    returns the class-level dict that mindformers' ``pipeline`` module holds too, so updating it in
    place is seen everywhere.
    """
    tasks = MindFormerBook.get_pipeline_support_task_list()
    tasks.setdefault(TASK, OrderedDict()).setdefault("common", PIPELINE_CONFIG)


def generation_defaults(config) -> Dict[str, object]:
    """Generation options set in a model config (the YAML ``model_config``), as ``generate`` kwargs.

    Only keys that are present count, so the defaults of ``generate`` (greedy, stop on the
    config's stop ids, fill the context) apply to everything else.
    """
    options = {}
    for key, option in GENERATION_KEYS.items():
        value = getattr(config, key, None)
        if value is not None and option not in options:
            options[option] = value
    if options.get("top_k") is not None:
        options["top_k"] = int(options["top_k"])
    return options


def model_inputs(inputs: Dict[str, object]) -> Dict[str, object]:
    """Processor outputs -> ``CogVLM2ForVideo.generate`` keyword arguments: everything but other
    processors' ``raw_query`` (generate takes and checks ``frame_indices``/``frames_per_sample``)."""
    return {key: value for key, value in inputs.items() if key != "raw_query"}


def generate_ids(model, inputs: Dict[str, object], on_tokens=None, **options) -> List[np.ndarray]:
    """Generate for processor outputs with the model config's generation settings (``options``
    override them). Returns the new token ids of each sample (ending with the stop token, if any)."""
    settings = generation_defaults(model.config)
    settings.update({k: v for k, v in options.items() if v is not None})
    return model.generate(**model_inputs(inputs), on_tokens=on_tokens, **settings).new_tokens


@MindFormerRegister.register(MindFormerModuleType.PIPELINE, alias=TASK)
class CogVLM2VideoPipeline(MultiModalToTextPipeline):
    """mindformers' multi-modal-to-text pipeline, with the model call adapted to CogVLM2ForVideo.

    ``pipeline(task="multi_modal_to_text_generation", model=network, processor=processor)`` builds
    it; calling it with ``[[{"video": path}, {"text": prompt}]]`` returns the answers. Generation
    options given to the call (``max_new_tokens``, ``do_sample``, ``top_k``, ``top_p``,
    ``temperature``, ``repetition_penalty``, ``seed``) override the model config's.
    """

    def _sanitize_parameters(self, **pipeline_parameters):
        forward = {key: pipeline_parameters[key] for key in set(GENERATION_KEYS.values())
                   if pipeline_parameters.get(key) is not None}
        return {}, forward, {}

    def _forward(self, inputs, **forward_params):
        from cogvlm2.cogvlm2 import CogVLM2ForVideo
        if not isinstance(self.network, CogVLM2ForVideo):
            return super()._forward(inputs)
        return {"output_ids": generate_ids(self.network, inputs, **forward_params)}


# ----- strict checkpoint loading in the Trainer flow ---------------------------------------------
def convert_name(weight_name: str) -> Optional[str]:
    """Checkpoint tensor name -> parameter name (HF names are our names), None for the tensors that
    are not parameters (``rotary_emb.inv_freq``). mindformers calls a directory "HF format" when
    some name changes, so HF directories (which hold inv_freq) go through ``convert_weight_dict``."""
    return weights.hf_to_ms_name(weight_name)


def convert_weight_dict(model, source_dict: Dict[str, object], **kwargs) -> Dict[str, object]:
    """The tensors mindformers read from a HF directory -> the model's parameters, strictly: an
    unknown tensor or a wrong shape is a CheckpointError (missing ones are caught after loading).
    Linear weights are transposed from the PyTorch (out, in) layout to the model's (in, out)."""
    from mindspore import Parameter, ops
    del kwargs  # model_config: the network already holds it
    layout = weights.checkpoint_layout(model)
    expected = {name: shape for name, (shape, _) in layout.items()}
    converted = {}
    for name, value in source_dict.items():
        target = convert_name(name)
        if target is None:
            continue
        weights.check_tensor(target, tuple(value.shape), expected, "load_checkpoint")
        if layout[target][1]:
            value = Parameter(ops.transpose(value, (1, 0)).contiguous(), name=target)
        converted[target] = value
    return converted


def check_parameters_loaded(model):
    """Raise a CheckpointError if a parameter was never given a value.

    In the Trainer flow the network is built without initial values (``no_init_parameters``) and the
    checkpoint fills it; whatever is still uninitialised was missing from the checkpoint (mindformers
    would fill it with random values and only log a warning).
    """
    params = list(model.get_parameters())
    missing = [p.name for p in params if p.has_init]
    if missing:
        raise CheckpointError(
            f"load_checkpoint: {len(missing)} of {len(params)} parameters are not in the checkpoint, "
            f"first {missing[0]}. Is it a CogVLM2-Video checkpoint for this config? Give a HF "
            "directory (config.json + model.safetensors.index.json + shards) or the output of "
            "tools/convert_weight.py, and load_ckpt_format: safetensors")


register_pipeline_task()
