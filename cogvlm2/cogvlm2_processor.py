"""CogVLM2-Video processor: a video file and a question -> the model's inputs.

It reproduces the official ``build_conversation_input_ids`` (THUDM CogVLM2-Video):

- frames: read by ``cogvlm2_video_io`` (decord; ``chat`` or ``base`` selection);
- ``pixel_values`` (T, 3, S, S) float32: uint8 -> /255 -> normalize (mean, std) -> resize the short
  side to S (bilinear, align_corners=False, no antialias; long side int(long * S / short)) -> center
  crop S with offsets round((h - S) / 2). The resize reproduces torch's float32 arithmetic: source
  coordinate ``(i + 0.5) * (in / out) - 0.5`` in float32, so the result matches to ~1e-7 (OpenCV's
  resize computes coordinates in double and differs by up to 4e-5). Only the pixels the crop needs
  are gathered and normalized (24 frames of 720p: about 70 ms on two CPU cores).
- ids: ``[bos]``, per frame ``vision_tokens_per_frame`` pad ids of token type VISION (in ``chat``
  followed by the tokens of ``str(i)``, type LANGUAGE), then the prompt of the template
  (``chat``: ``"Question: {q} Answer: {a}\\n"`` per history turn then ``"Question: {query} Answer:"``;
  ``vqa``: the same with ``Short answer:``; ``base``: the query alone, history ignored, as the
  reference's ``_history_to_prompt`` does). Text is encoded without special tokens.
- ``position_ids`` by the reference ``build_position_ids``: the first and last token of every run of
  VISION tokens count as language, a run's interior shares one position.

Inputs: ``processor(text=..., video=path_or_frames_or_None, history=[(q, a), ...])``, or the
mindformers query form ``processor([{"video": path}, {"text": prompt}])`` (``"image"`` also accepted),
or a batch ``processor([[...], [...]])`` / ``processor(query_list=...)``. A single image file is
read as a one-frame video.
"""
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mindformers.models.base_processor import BaseProcessor
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from cogvlm2.cogvlm2_errors import CogVLM2InputError
from cogvlm2.cogvlm2_token_types import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE, build_position_ids
from cogvlm2.cogvlm2_tokenizer import CogVLM2Tokenizer
from cogvlm2.cogvlm2_video_io import FRAME_STRATEGIES, load_frames

TEMPLATES = ("base", "chat", "vqa")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "position_ids")


# ------------------------------------------------------------------------------------ prompt
def build_prompt(template_version: str, query: str, history: Sequence[Tuple[str, str]] = ()) -> str:
    """The text part of the conversation for a template (``base`` ignores the history)."""
    if template_version in ("chat", "vqa"):
        answer = "Answer:" if template_version == "chat" else "Short answer:"
        turns = "".join(f"Question: {q} {answer} {a}\n" for q, a in history)
        return f"{turns}Question: {query} {answer}"
    if template_version == "base":
        return query
    raise CogVLM2InputError(f"unknown template_version {template_version!r}: choose one of {TEMPLATES}")


# ------------------------------------------------------------------------------------ pixels
def _linear_taps(in_size: int, out_size: int, start: int, count: int):
    """Source indices and weights of torch's bilinear resize (align_corners=False, float32) for
    output positions start..start+count-1."""
    scale = np.float32(in_size) / np.float32(out_size)
    position = np.arange(start, start + count, dtype=np.float32)
    source = (position + np.float32(0.5)) * scale - np.float32(0.5)
    source = np.maximum(source, np.float32(0))
    index0 = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    weight1 = np.clip(source - index0.astype(np.float32), 0, 1).astype(np.float32)
    index1 = np.minimum(index0 + 1, in_size - 1)
    return index0, index1, np.float32(1) - weight1, weight1


def resized_size(height: int, width: int, image_size: int) -> Tuple[int, int]:
    """Size after resizing the short side to ``image_size`` (torchvision's rule)."""
    short, long = min(height, width), max(height, width)
    new_long = int(image_size * long / short)
    return (image_size, new_long) if height <= width else (new_long, image_size)


def normalization_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(256, 3) float32: ``(v / 255 - mean[c]) / std[c]`` for every uint8 value v and channel c,
    computed with the reference's float32 operations, so a lookup equals normalizing pixel by pixel."""
    values = np.arange(256, dtype=np.float32)[:, None] / np.float32(255)
    return (values - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


def _normalized(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 (T, S, S, 3) -> float32 (T, 3, S, S) through the normalization table."""
    planes = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    out = np.empty(planes.shape, dtype=np.float32)
    for channel in range(3):
        np.take(table[:, channel], planes[:, channel], out=out[:, channel])
    return out


def transform_frames(frames: np.ndarray, image_size: int, mean: Sequence[float],
                     std: Sequence[float]) -> np.ndarray:
    """uint8 RGB frames (T, H, W, 3) -> normalized, resized, center-cropped (T, 3, S, S) float32.

    Same arithmetic as the reference (normalize, then bilinear resize, then crop) but evaluated only
    at the output pixels the crop keeps: each output is
    ``(a * wx0 + b * wx1) * wy0 + (c * wx0 + d * wx1) * wy1`` over its four normalized source pixels.
    """
    _, height, width, _ = frames.shape
    new_h, new_w = resized_size(height, width, image_size)
    top, left = int(round((new_h - image_size) / 2)), int(round((new_w - image_size) / 2))
    y0, y1, wy0, wy1 = _linear_taps(height, new_h, top, image_size)
    x0, x1, wx0, wx1 = _linear_taps(width, new_w, left, image_size)
    table = normalization_table(mean, std)

    def along_x(rows):  # (T, 3, S, S): the source rows, interpolated along x
        row_pixels = np.take(frames, rows, axis=1)  # (T, S, W, 3) uint8
        left_px = _normalized(np.take(row_pixels, x0, axis=2), table)
        right_px = _normalized(np.take(row_pixels, x1, axis=2), table)
        left_px *= wx0
        right_px *= wx1
        left_px += right_px
        return left_px

    upper, lower = along_x(y0), along_x(y1)
    upper *= wy0[:, None]
    lower *= wy1[:, None]
    upper += lower
    return upper


# ------------------------------------------------------------------------------------ processor
@MindFormerRegister.register(MindFormerModuleType.PROCESSOR)
class CogVLM2Processor(BaseProcessor):
    """Video + question (+ chat history) -> CogVLM2-Video inputs, identical to the official code.

    Args:
        tokenizer: a ``CogVLM2Tokenizer`` (built with the default vocabulary when ``None``).
        template_version: ``"chat"`` (default), ``"base"`` or ``"vqa"``.
        num_frames: at most this many frames per video (24).
        image_size: frame side after resize and crop (224).
        max_length: the longest allowed prompt in tokens (2048); longer prompts raise.
        image_mean, image_std: per-channel normalization (CLIP's).
        vision_tokens_per_frame: placeholder tokens per frame (64 patches + boi + eoi = 66).
        frame_strategy: ``"chat"`` or ``"base"`` frame selection; ``None`` = ``chat`` for the chat
            template, ``base`` otherwise.
        base_max_seconds: the ``base`` selection spreads frames over the first this-many seconds (60).
    """

    output_columns = list(TEXT_COLUMNS) + ["pixel_values"]

    def __init__(self, tokenizer: Optional[CogVLM2Tokenizer] = None, template_version: str = "chat",
                 num_frames: int = 24, image_size: int = 224, max_length: int = 2048,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD,
                 vision_tokens_per_frame: int = 66, frame_strategy: Optional[str] = None,
                 base_max_seconds: float = 60):
        tokenizer = tokenizer if tokenizer is not None else CogVLM2Tokenizer()
        super().__init__(tokenizer=tokenizer, max_length=max_length)
        self.template_version = template_version
        self.num_frames = num_frames
        self.image_size = image_size
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.vision_tokens_per_frame = vision_tokens_per_frame
        self._frame_strategy = frame_strategy
        self.base_max_seconds = base_max_seconds
        self._check_config()

    @property
    def frame_strategy(self) -> str:
        """The frame selection: as set, else ``chat`` for the chat template and ``base`` otherwise."""
        return self._frame_strategy or ("chat" if self.template_version == "chat" else "base")

    def apply_model_config(self, config):
        """Take the sizes from a ``CogVLM2Config``, so a YAML or config.json states each once: template,
        frame count, frame size, vision tokens per frame and the context length."""
        self.template_version = config.template_version
        self.num_frames = config.num_frames
        self.image_size = config.image_size
        self.vision_tokens_per_frame = config.vision_tokens_per_frame
        self.max_length = config.max_position_embeddings
        self._check_config()
        return self

    def _check_config(self):
        if self.template_version not in TEMPLATES:
            raise CogVLM2InputError(f"unknown template_version {self.template_version!r}: "
                                    f"choose one of {TEMPLATES}")
        if self.frame_strategy not in FRAME_STRATEGIES:
            raise CogVLM2InputError(f"unknown frame_strategy {self.frame_strategy!r}: "
                                    f"choose one of {FRAME_STRATEGIES}")
        for name in ("num_frames", "image_size", "max_length", "vision_tokens_per_frame"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise CogVLM2InputError(f"{name} must be a positive integer, got {value!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise CogVLM2InputError(f"image_mean and image_std need 3 values (RGB), std > 0; got "
                                    f"{self.image_mean} and {self.image_std}")

    # -------------------------------------------------------------------- reusable pieces
    def load_video(self, path) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 RGB frames (T, H, W, 3) and their indices (T,) of a video or image file."""
        return load_frames(path, self.frame_strategy, self.num_frames, self.base_max_seconds)

    def transform(self, frames: np.ndarray) -> np.ndarray:
        """uint8 RGB frames (T, H, W, 3) -> pixel_values (T, 3, image_size, image_size) float32."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not frames.shape[0]:
            raise CogVLM2InputError(f"frames must be uint8 RGB of shape (T, H, W, 3) with T >= 1, got "
                                    f"{frames.dtype} {frames.shape}")
        return transform_frames(frames, self.image_size, self.image_mean, self.image_std)

    def build_inputs(self, text: str, num_frames: Optional[int] = None,
                     history: Optional[Sequence[Tuple[str, str]]] = None,
                     check_length: bool = True) -> Dict[str, np.ndarray]:
        """Token ids / types / mask / positions, each (1, L) int64, for a prompt and ``num_frames``
        frames (``None`` or 0: no video). Needs no video decoding, so a chat can rebuild its ids.
        ``check_length=False``: the caller checks the length (a training sample adds its response)."""
        history = self._checked_history(history)
        if not isinstance(text, str):
            raise CogVLM2InputError(f"text must be a str, got {type(text).__name__}")
        video_ids, video_types = self._video_tokens(num_frames or 0)
        text_ids = self.tokenizer.encode(build_prompt(self.template_version, text, history))
        input_ids = [self.tokenizer.bos_token_id] + video_ids + text_ids
        token_types = [LANGUAGE_TOKEN_TYPE] + video_types + [LANGUAGE_TOKEN_TYPE] * len(text_ids)
        if check_length:
            self._check_length(len(input_ids), len(video_ids), num_frames or 0)
        token_types = np.asarray(token_types, dtype=np.int64)
        return {
            "input_ids": np.asarray(input_ids, dtype=np.int64)[None],
            "token_type_ids": token_types[None],
            "attention_mask": np.ones((1, len(input_ids)), dtype=np.int64),
            "position_ids": build_position_ids(token_types)[None],
        }

    def _video_tokens(self, num_frames: int) -> Tuple[List[int], List[int]]:
        pad, per_frame = self.tokenizer.pad_token_id, self.vision_tokens_per_frame
        if self.template_version != "chat":
            return [pad] * per_frame * num_frames, [VISION_TOKEN_TYPE] * per_frame * num_frames
        ids, types = [], []
        for frame in range(num_frames):
            time_ids = self.tokenizer.encode(str(frame))
            ids += [pad] * per_frame + time_ids
            types += [VISION_TOKEN_TYPE] * per_frame + [LANGUAGE_TOKEN_TYPE] * len(time_ids)
        return ids, types

    def _check_length(self, total: int, n_video: int, num_frames: int):
        if total > self.max_length:
            raise CogVLM2InputError(
                f"the prompt needs {total} tokens ({n_video} for {num_frames} video frames, "
                f"{total - n_video} for the text and history), more than max_length={self.max_length}. "
                "Shorten the question or the history, or use fewer frames (num_frames)")

    def _checked_history(self, history) -> List[Tuple[str, str]]:
        history = list(history or [])
        for i, turn in enumerate(history):
            if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise CogVLM2InputError(f"history[{i}] must be a (question, answer) pair of str, got {turn!r}")
        if history and self.template_version == "base":
            warnings.warn(f"template {self.template_version!r} ignores the history (as the reference does); "
                          "use template_version='chat' for multi-turn conversations", stacklevel=3)
        return history

    # -------------------------------------------------------------------- calls
    def __call__(self, text=None, video=None, history=None, *, query_list=None) -> Dict[str, np.ndarray]:
        """Model inputs for one conversation turn.

        ``text``: the question, or a query list ``[{"video": path}, {"text": prompt}]``, or a batch of
        query lists (also accepted as ``query_list=``). ``video``: a video/image path, uint8 RGB frames
        (T, H, W, 3), or None. ``history``: earlier (question, answer) turns (single query only).

        Returns numpy arrays ``input_ids``, ``token_type_ids``, ``attention_mask``, ``position_ids``
        (1, L) int64, ``pixel_values`` (T, 3, S, S) float32 or None and ``frame_indices`` (T,) or None.
        A batch is left-padded (pad id, type LANGUAGE, mask 0, position 0; positions of each sample as
        if alone) to (B, L); its frames are concatenated in sample order and ``frames_per_sample`` (B,)
        says how many belong to each sample.
        """
        if query_list is not None:
            text = query_list
        if isinstance(text, (list, tuple)) and text and all(isinstance(q, (list, tuple)) for q in text):
            if history is not None or video is not None:
                raise CogVLM2InputError("a batch of queries takes no separate video or history argument")
            return self._batch([self._parse_query(q) for q in text])
        if isinstance(text, (list, tuple)):
            if video is not None:
                raise CogVLM2InputError("give the video either inside the query list or as video=, not both")
            text, video = self._parse_query(text)
        if text is None:
            raise CogVLM2InputError("no question given: pass text='...' or a query with {'text': ...}")
        return self._single(text, video, history)

    def _single(self, text: str, video, history) -> Dict[str, np.ndarray]:
        frames, frame_indices = self._frames(video)
        inputs = self.build_inputs(text, None if frames is None else len(frames), history)
        inputs["pixel_values"] = None if frames is None else self.transform(frames)
        inputs["frame_indices"] = frame_indices
        return inputs

    def _frames(self, video):
        if video is None:
            return None, None
        if isinstance(video, np.ndarray):
            return video, np.arange(len(video), dtype=np.int64)
        return self.load_video(video)

    @staticmethod
    def _parse_query(query) -> Tuple[Optional[str], object]:
        """(text, video) of ``[{"video": path}, {"text": prompt}]``: ``"image"`` is a one-frame video,
        several text items are joined in order."""
        text, video = None, None
        for item in query:
            if not isinstance(item, dict) or len(item) != 1:
                raise CogVLM2InputError(f"a query item must be a dict with one key, e.g. {{'text': ...}}; got {item!r}")
            (key, value), = item.items()
            if key == "text":
                text = value if text is None else f"{text}{value}"
            elif key in ("video", "image"):
                if video is not None:
                    raise CogVLM2InputError("a query can hold one video or image; got more than one")
                video = value
            else:
                raise CogVLM2InputError(f"unknown query key {key!r}: use 'text', 'video' or 'image'")
        if text is None:
            raise CogVLM2InputError(f"the query {query!r} has no {{'text': ...}} item")
        return text, video

    def _batch(self, queries) -> Dict[str, np.ndarray]:
        samples = [self._single(text, video, None) for text, video in queries]
        length = max(s["input_ids"].shape[1] for s in samples)
        fill = {"input_ids": self.tokenizer.pad_token_id, "token_type_ids": LANGUAGE_TOKEN_TYPE,
                "attention_mask": 0, "position_ids": 0}
        batch = {key: np.stack([np.pad(s[key][0], (length - s[key].shape[1], 0), constant_values=value)
                                for s in samples]) for key, value in fill.items()}
        with_video = [s for s in samples if s["pixel_values"] is not None]
        batch["pixel_values"] = np.concatenate([s["pixel_values"] for s in with_video]) if with_video else None
        batch["frame_indices"] = np.concatenate([s["frame_indices"] for s in with_video]) if with_video else None
        batch["frames_per_sample"] = np.asarray(
            [0 if s["pixel_values"] is None else len(s["pixel_values"]) for s in samples], dtype=np.int64)
        return batch

    def post_process(self, output_ids, skip_special_tokens: bool = True) -> List[str]:
        """Decode each row of generated ids (the mindformers pipeline calls this)."""
        return [self.tokenizer.decode(ids, skip_special_tokens) for ids in output_ids]
