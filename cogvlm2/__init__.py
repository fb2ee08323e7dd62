"""CogVLM2-Video for MindSpore: a mindformers plugin.

Importing this package registers the config, model, tokenizer and processor with mindformers'
``MindFormerRegister`` so a YAML ``type:`` can name them.
"""
from cogvlm2.cogvlm2_config import CogVLM2Config, CogVLM2VisionConfig
from cogvlm2.cogvlm2 import CogVLM2ForVideo
# -- processor / tokenizer --
from cogvlm2.cogvlm2_errors import CogVLM2InputError
from cogvlm2.cogvlm2_tokenizer import CogVLM2Tokenizer, StreamDecoder
from cogvlm2.cogvlm2_processor import CogVLM2Processor
# -- end processor / tokenizer --

__all__ = ["CogVLM2Config", "CogVLM2VisionConfig", "CogVLM2ForVideo",
           "CogVLM2Tokenizer", "StreamDecoder", "CogVLM2Processor", "CogVLM2InputError"]
