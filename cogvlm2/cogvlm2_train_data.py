"""Training inputs: one (query, response, history, video | image | none) -> a training sample, an
ms-swift JSONL dataset of them, and batches padded so that the loss does not change.

A sample is the official ``build_conversation_input_ids(..., answer=response)``: the prompt part of the
processor (``[bos]``, vision placeholders, the template text) followed by the response's token ids
(no BOS) and eos, the appended tokens with token type LANGUAGE and attention 1. ``labels`` is -100 on
every prompt position (vision included) and the appended ids on the appended positions.

A batch is right-padded (pad id, type LANGUAGE, mask 0, label -100): a causal model never lets a real
token see a later pad, and pads carry no label, so every sample's loss is what it is alone. The loss
graph needs only the positions that predict a label: ``label_index`` (M, 1) flat positions b*L + t
whose next label is not -100, ``targets`` (M,) the labels at t+1.
"""
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from cogvlm2.cogvlm2_errors import CogVLM2InputError, ContextLengthError
from cogvlm2.cogvlm2_token_types import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE, causal_bias, vision_expert_mask

__all__ = ["IGNORE_INDEX", "build_training_sample", "collate", "JsonlDataset", "split_for_rank"]

IGNORE_INDEX = -100


def build_training_sample(processor, query: str, response: str, history=None, video=None,
                          image=None) -> Dict[str, np.ndarray]:
    """(L,) int64 input_ids, token_type_ids, attention_mask, labels, position_ids; pixel_values
    (T, 3, S, S) float32 or None; n_label (int). ``video``/``image``: a path or uint8 frames."""
    if not isinstance(response, str) or not response:
        raise CogVLM2InputError(f"response must be a non-empty str, got {response!r}")
    if video is not None and image is not None:
        raise CogVLM2InputError("a sample holds one video or one image, not both")
    media = video if video is not None else image
    frames = None
    if media is not None:
        frames = processor.load_video(media)[0] if not isinstance(media, np.ndarray) else media
    # the whole sample (prompt + response) is checked against the context below
    prompt = processor.build_inputs(query, None if frames is None else len(frames), history, check_length=False)
    answer = processor.tokenizer.encode(response) + [processor.tokenizer.eos_token_id]
    prompt_ids = prompt["input_ids"][0]
    length = len(prompt_ids) + len(answer)
    if length > processor.max_length:
        raise ContextLengthError(f"the sample needs {length} tokens ({len(prompt_ids)} prompt + {len(answer)} "
                                 f"response), more than the context of {processor.max_length}")
    n_prompt = len(prompt_ids)
    types = np.concatenate([prompt["token_type_ids"][0], np.full(len(answer), LANGUAGE_TOKEN_TYPE)])
    positions = prompt["position_ids"][0]
    # appended tokens are language tokens: each takes the next position
    positions = np.concatenate([positions, positions[-1] + 1 + np.arange(len(answer))])
    return {
        "input_ids": np.concatenate([prompt_ids, answer]).astype(np.int64),
        "token_type_ids": types.astype(np.int64),
        "attention_mask": np.ones(length, np.int64),
        "labels": np.concatenate([np.full(n_prompt, IGNORE_INDEX), answer]).astype(np.int64),
        "position_ids": positions.astype(np.int64),
        "pixel_values": None if frames is None else processor.transform(frames),
        "n_label": len(answer),
    }


def collate(samples: Sequence[Dict[str, np.ndarray]], pad_token_id: int) -> Dict[str, np.ndarray]:
    """Right-pad samples to (B, L) and list what the loss graph needs (numpy):

    input_ids, token_type_ids, position_ids (B, L); expert_mask (B, L) float32; bias (B, 1, L, L);
    vision_index (N, 1) flat positions of the VISION tokens; pixel_values (T, 3, S, S) of all samples
    in order (or None); label_index (M, 1) flat positions whose next token is a label; targets (M,);
    label_sample (M,) the sample of each label; n_label (B,).
    """
    if not samples:
        raise CogVLM2InputError("an empty batch")
    length = max(len(s["input_ids"]) for s in samples)

    def pad(key, value):
        return np.stack([np.pad(s[key], (0, length - len(s[key])), constant_values=value) for s in samples])

    input_ids, types = pad("input_ids", pad_token_id), pad("token_type_ids", LANGUAGE_TOKEN_TYPE)
    mask, labels, positions = pad("attention_mask", 0), pad("labels", IGNORE_INDEX), pad("position_ids", 0)
    # logits at t are scored against labels at t + 1
    rows, cols = np.nonzero(labels[:, 1:] != IGNORE_INDEX)                # (M,) each
    pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return {
        "input_ids": input_ids, "token_type_ids": types, "position_ids": positions,
        "expert_mask": vision_expert_mask(types),
        "bias": causal_bias(mask, 0),                                         # (B, 1, L, L)
        "vision_index": np.flatnonzero(types.reshape(-1) == VISION_TOKEN_TYPE).reshape(-1, 1),
        "pixel_values": np.concatenate(pixels) if pixels else None,
        "label_index": (rows * length + cols).reshape(-1, 1),
        "targets": labels[rows, cols + 1],
        "label_sample": rows,
        "n_label": np.asarray([s["n_label"] for s in samples], np.int64),
    }


def split_for_rank(indices: Sequence[int], rank: int, world_size: int) -> List[int]:
    """The part of a global batch that ``rank`` computes: a contiguous slice, sizes differing by at
    most one (the loss is token-weighted over the global batch, so uneven parts are exact)."""
    bounds = np.linspace(0, len(indices), world_size + 1).round().astype(int)
    return list(indices[bounds[rank]:bounds[rank + 1]])


class JsonlDataset:
    """ms-swift's JSONL: one object per line, ``{"query", "response", "history"?, "videos"? |
    "images"?}`` (one video or image per sample; media paths relative to the file).

    The lines are parsed and checked at once (keys, types, media files exist); samples are built
    when used (video decoding is the costly part). With ``skip_bad_samples`` a sample that cannot be
    built (corrupt video, longer than the context) is skipped and counted in ``skipped``; otherwise
    the error names the file and line.
    """

    def __init__(self, path: str, processor, skip_bad_samples: bool = False):
        self.path = path
        self.processor = processor
        self.skip_bad_samples = skip_bad_samples
        self.skipped: Dict[int, str] = {}
        if not os.path.isfile(path):
            raise CogVLM2InputError(f"train dataset not found: {path!r}; pass --train_dataset FILE.jsonl")
        self.records = []
        folder = os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = self._parse(line, number, folder)
                    if record is not None:
                        self.records.append(record)
        if not self.records:
            raise CogVLM2InputError(f"{path}: the dataset has no samples (one JSON object per line: "
                                    '{"query": ..., "response": ..., "videos": [...]})')

    def _parse(self, line: str, number: int, folder: str) -> Optional[dict]:
        where = f"{self.path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CogVLM2InputError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise CogVLM2InputError(f"{where}: a line must be a JSON object, got {type(obj).__name__}")
        for key in ("query", "response"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise CogVLM2InputError(f"{where}: {key!r} is missing or not a non-empty string")
        history = obj.get("history") or []
        if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 for t in history):
            raise CogVLM2InputError(f"{where}: 'history' must be a list of [query, response] pairs")
        media = {}
        for key in ("videos", "images"):
            paths = obj.get(key) or []
            if isinstance(paths, str):
                paths = [paths]
            if len(paths) > 1:
                raise CogVLM2InputError(f"{where}: {key!r} lists {len(paths)} files; CogVLM2-Video takes one")
            if paths:
                path = paths[0] if os.path.isabs(paths[0]) else os.path.join(folder, paths[0])
                if not os.path.isfile(path):
                    message = f"{where}: {key[:-1]} file not found: {path}"
                    if self.skip_bad_samples:
                        self.skipped[number] = message
                        return None
                    raise CogVLM2InputError(message)
                media[key[:-1]] = path
        if len(media) > 1:
            raise CogVLM2InputError(f"{where}: give 'videos' or 'images', not both")
        return {"line": number, "query": obj["query"], "response": obj["response"],
                "history": [tuple(t) for t in history], **media}

    def __len__(self):
        return len(self.records)

    def sample(self, index: int) -> Optional[Dict[str, np.ndarray]]:
        """The training sample of record ``index``, or None if it is bad and skipping is on."""
        record = self.records[index]
        try:
            return build_training_sample(self.processor, record["query"], record["response"], record["history"],
                                         video=record.get("video"), image=record.get("image"))
        except CogVLM2InputError as err:   # ContextLengthError is not an input error; see below
            message = f"{self.path}:{record['line']}: {err}"
        except ContextLengthError as err:
            message = f"{self.path}:{record['line']}: {err}; shorten it or pass --skip_bad_samples"
        if self.skip_bad_samples:
            self.skipped[record["line"]] = message
            return None
        raise CogVLM2InputError(message)
