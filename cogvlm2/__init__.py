"""CogVLM2-Video for MindSpore: a mindformers plugin.

Importing this package registers the config, model, tokenizer and processor with mindformers'
``MindFormerRegister`` so a YAML ``type:`` can name them, and makes mindformers' predict flow
(``run_mindformer.py --run_mode predict``, task ``multi_modal_to_text_generation``) work with them.
"""
from cogvlm2.cogvlm2_config import CogVLM2Config, CogVLM2VisionConfig
from cogvlm2.cogvlm2 import CogVLM2ForVideo
# -- processor / tokenizer --
from cogvlm2.cogvlm2_errors import CogVLM2InputError
from cogvlm2.cogvlm2_tokenizer import CogVLM2Tokenizer, StreamDecoder
from cogvlm2.cogvlm2_processor import CogVLM2Processor
# -- end processor / tokenizer --
# -- mindformers Trainer / pipeline integration --
from cogvlm2 import cogvlm2_mindformers  # noqa: F401  (registers the predict task and its pipeline)

__all__ = ["CogVLM2Config", "CogVLM2VisionConfig", "CogVLM2ForVideo",
           "CogVLM2Tokenizer", "StreamDecoder", "CogVLM2Processor", "CogVLM2InputError"]
