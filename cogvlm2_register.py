"""Shim for mindformers' YAML ``auto_register`` key (used by ``run_mindformer.py --register_path``).

mindformers copies this one file into its module cache (``./modules/openmind_modules/...``) and
imports it from there, so it only imports the installed ``cogvlm2`` package with absolute imports;
importing the package registers the config, model, tokenizer, processor and the predict pipeline.
"""
from cogvlm2 import CogVLM2Config, CogVLM2ForVideo, CogVLM2Processor, CogVLM2Tokenizer  # noqa: F401
from cogvlm2.cogvlm2_mindformers_train import CogVLM2FinetuneTrainer  # noqa: F401

__all__ = ["CogVLM2Config", "CogVLM2ForVideo", "CogVLM2Processor", "CogVLM2Tokenizer", "CogVLM2FinetuneTrainer"]
