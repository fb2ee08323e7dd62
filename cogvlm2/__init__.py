"""CogVLM2-Video for MindSpore: a mindformers plugin.

Importing this package registers the config, model, tokenizer and processor with mindformers'
``MindFormerRegister`` so a YAML ``type:`` can name them.
"""
from cogvlm2.cogvlm2_config import CogVLM2Config, CogVLM2VisionConfig
from cogvlm2.cogvlm2 import CogVLM2ForVideo
# -- processor / tokenizer --
# -- end processor / tokenizer --

__all__ = ["CogVLM2Config", "CogVLM2VisionConfig", "CogVLM2ForVideo"]
