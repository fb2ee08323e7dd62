"""CogVLM2-Video for MindSpore: a mindformers plugin.

Importing this package registers the config, model, tokenizer and processor with mindformers'
``MindFormerRegister`` so a YAML ``type:`` can name them, and makes mindformers' predict flow
(``run_mindformer.py --run_mode predict``, task ``multi_modal_to_text_generation``) work with them,
and its fine-tuning flow (``--run_mode finetune``, ``trainer.type: CogVLM2FinetuneTrainer``).

Layers, each importing only the ones below it: parts (config, vision tower, decoder, processor,
tokenizer, token types, errors) -> network (``CogVLM2ForVideo``) -> generation -> engine
(``CogVLM2Engine``: many requests on one loaded model) -> entry points (run_predict.py, ...).
"""
from cogvlm2.cogvlm2_config import CogVLM2Config, CogVLM2VisionConfig
from cogvlm2.cogvlm2_errors import (CheckpointError, CogVLM2ConfigError, CogVLM2Error, CogVLM2InputError,
                                    ContextLengthError, GenerationOptionError)
from cogvlm2.cogvlm2 import CogVLM2ForVideo
from cogvlm2.cogvlm2_tokenizer import CogVLM2Tokenizer, StreamDecoder
from cogvlm2.cogvlm2_processor import CogVLM2Processor
from cogvlm2.cogvlm2_generation import GenerationOptions, generate
from cogvlm2 import cogvlm2_mindformers  # noqa: F401  (registers the predict task and its pipeline)
from cogvlm2.cogvlm2_engine import CogVLM2Engine
from cogvlm2 import cogvlm2_mindformers_train  # noqa: F401  (registers the fine-tuning trainer)

__all__ = ["CogVLM2Config", "CogVLM2VisionConfig", "CogVLM2ForVideo", "CogVLM2Tokenizer", "StreamDecoder",
           "CogVLM2Processor", "GenerationOptions", "generate", "CogVLM2Engine", "CogVLM2Error",
           "CogVLM2InputError", "CogVLM2ConfigError", "CheckpointError", "ContextLengthError",
           "GenerationOptionError"]
