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
  and then fills them with random initial values; the network's hooks (``convert_weight_dict``,
  ``init_parameters_data``, see ``cogvlm2_weights``) raise a ``CheckpointError`` instead.

The engine (``cogvlm2_engine``) reads the same generation settings (``generation_defaults``).
"""
import os
from collections import OrderedDict
from typing import Dict, List

import numpy as np
from mindformers.mindformer_book import MindFormerBook
from mindformers.pipeline.multi_modal_to_text_generation_pipeline import MultiModalToTextPipeline
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from cogvlm2.cogvlm2 import CogVLM2ForVideo
from cogvlm2.cogvlm2_generation import GENERATION_KEYS, generate, generation_defaults

__all__ = ["TASK", "CogVLM2VideoPipeline", "register_pipeline_task", "generation_defaults", "model_inputs",
           "generate_ids"]

TASK = "multi_modal_to_text_generation"
PIPELINE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cogvlm2_pipeline.yaml")

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


def model_inputs(inputs: Dict[str, object]) -> Dict[str, object]:
    """Processor outputs -> ``CogVLM2ForVideo.generate`` keyword arguments: everything but other
    processors' ``raw_query`` (generate takes and checks ``frame_indices``/``frames_per_sample``)."""
    return {key: value for key, value in inputs.items() if key != "raw_query"}


def generate_ids(model, inputs: Dict[str, object], on_tokens=None, **options) -> List[np.ndarray]:
    """Generate for processor outputs with the model config's generation settings (``options``
    override them). Returns the new token ids of each sample (ending with the stop token, if any)."""
    settings = generation_defaults(model.config)
    settings.update({k: v for k, v in options.items() if v is not None})
    return generate(model, **model_inputs(inputs), on_tokens=on_tokens, **settings).new_tokens


@MindFormerRegister.register(MindFormerModuleType.PIPELINE, alias=TASK)
class CogVLM2VideoPipeline(MultiModalToTextPipeline):
    """mindformers' multi-modal-to-text pipeline, with the model call adapted to CogVLM2ForVideo.

    ``pipeline(task="multi_modal_to_text_generation", model=network, processor=processor)`` builds
    it; calling it with ``[[{"video": path}, {"text": prompt}]]`` returns the answers. Generation
    options given to the call (``max_new_tokens``, ``do_sample``, ``top_k``, ``top_p``,
    ``temperature``, ``repetition_penalty``, ``seed``) override the model config's.
    """

    def __init__(self, model, processor=None, **kwargs):
        super().__init__(model, processor=processor, **kwargs)
        if isinstance(self.network, CogVLM2ForVideo) and self.processor is not None \
                and hasattr(self.processor, "apply_model_config"):
            self.processor.apply_model_config(self.network.config)   # sizes stated once, in model_config

    def _sanitize_parameters(self, **pipeline_parameters):
        forward = {key: pipeline_parameters[key] for key in set(GENERATION_KEYS.values())
                   if pipeline_parameters.get(key) is not None}
        return {}, forward, {}

    def _forward(self, inputs, **forward_params):
        if not isinstance(self.network, CogVLM2ForVideo):
            return super()._forward(inputs)
        return {"output_ids": generate_ids(self.network, inputs, **forward_params)}


register_pipeline_task()
