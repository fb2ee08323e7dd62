"""CogVLM2ForVideo: EVA2-CLIP-E vision tower + adapter + visual-expert Llama-3 decoder.

Two graphs are compiled (GRAPH_MODE by default), each once:
- ``model.vision``: one frame (1, 3, 224, 224) -> vision embeddings (1, 66, hidden), a static shape
  run once per frame (on CPU, static-shape kernels run this tower 1.7x faster than a dynamic T);
- the causal-LM step (``CausalLMStep``), with dynamic batch, length and cache length: token ids +
  vision embeddings + cache -> logits at the requested positions + the extended cache. It serves
  prefill (empty cache) and every decode step.

The Python methods (``__call__``, ``encode_video``, ``generate``) prepare numpy inputs and call them.
"""
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor, mutable, nn, ops
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from cogvlm2.cogvlm2_config import CogVLM2Config
from cogvlm2.cogvlm2_layers import Linear, to_ms_dtype
from cogvlm2.cogvlm2_llm import VISION_TOKEN_TYPE, CogVLM2Model, vision_expert_mask
from cogvlm2 import cogvlm2_generation as generation
from cogvlm2 import cogvlm2_weights as weights
from cogvlm2.cogvlm2_generation import GenerationOptions, GenerationOutput

__all__ = ["CogVLM2ForVideo", "CausalLMStep"]

MASK_VALUE = -1e9   # additive attention bias for masked keys (finite: padded rows stay NaN-free)


class CausalLMStep(nn.Cell):
    """Decoder + lm_head on the positions that need logits. Shares ``model``/``lm_head`` (and so their
    parameter names) with CogVLM2ForVideo.

    input_ids (B, L) int32, vision_embeds (N, H), vision_index (N, 1) int32, expert_mask (B, L),
    position_ids (B, L) int32, bias (B, 1, L, S+L) float32, past: tuple of 2*layers (B, Hkv, S, d),
    logits_index (M, 1) int32 flat positions b*L + l -> logits (M, vocab) float32, new past.
    """

    def __init__(self, model: CogVLM2Model, lm_head: Linear):
        super().__init__()
        self.model = model
        self.lm_head = lm_head

    @ms.jit   # compiled as a graph in PYNATIVE_MODE too (GRAPH_MODE compiles every Cell anyway)
    def construct(self, input_ids, vision_embeds, vision_index, expert_mask, position_ids, bias, past,
                  logits_index):
        hidden, new_past = self.model(input_ids, vision_embeds, vision_index, expert_mask, position_ids,
                                      bias, past)                                  # (B*L, H)
        picked = ops.gather_nd(hidden, logits_index)                               # (M, H)
        return self.lm_head(picked).astype(ms.float32), new_past                   # (M, vocab)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class CogVLM2ForVideo(PreTrainedModel):
    """CogVLM2-Video-Llama3-Chat for MindSpore (``CogVLMVideoForCausalLM`` in the official code)."""

    config_class = CogVLM2Config
    base_model_prefix = "model"

    def __init__(self, config: CogVLM2Config = None, compile_graphs: bool = True, **kwargs):
        config = config if config is not None else CogVLM2Config()
        if isinstance(config, dict):
            config = CogVLM2Config(**config)
        super().__init__(config, **kwargs)
        self.config = config
        self.model = CogVLM2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, to_ms_dtype(config.param_init_type))
        # Not registered as a child cell: it shares model/lm_head, whose names stay model.* / lm_head.*
        object.__setattr__(self, "step", CausalLMStep(self.model, self.lm_head))
        object.__setattr__(self, "_last_video", None)   # (key, frame count, vision rows) for chat()
        if compile_graphs and config.is_dynamic:
            self._declare_dynamic_inputs()

    # ----- graphs --------------------------------------------------------------------------------
    def _declare_dynamic_inputs(self):
        """One compiled step graph for every batch size, length and cache length."""
        c = self.config
        dtype = to_ms_dtype(c.compute_dtype)
        kv = Tensor(shape=[None, c.num_multi_query_heads, None, c.head_dim], dtype=dtype)
        self.step.set_inputs(
            Tensor(shape=[None, None], dtype=ms.int32),                  # input_ids
            Tensor(shape=[None, c.hidden_size], dtype=dtype),            # vision_embeds
            Tensor(shape=[None, 1], dtype=ms.int32),                     # vision_index
            Tensor(shape=[None, None], dtype=ms.float32),                # expert_mask
            Tensor(shape=[None, None], dtype=ms.int32),                  # position_ids
            Tensor(shape=[None, 1, None, None], dtype=ms.float32),       # bias
            mutable(tuple(kv for _ in range(2 * c.num_hidden_layers))),  # past
            Tensor(shape=[None, 1], dtype=ms.int32))                     # logits_index

    def empty_cache(self, batch_size: int) -> tuple:
        """A KV cache with no tokens: 2 * layers tensors (B, Hkv, 0, d)."""
        c = self.config
        empty = Tensor(np.zeros((batch_size, c.num_multi_query_heads, 0, c.head_dim), np.float32),
                       dtype=to_ms_dtype(c.compute_dtype))
        return mutable(tuple(empty for _ in range(2 * c.num_hidden_layers)))

    # ----- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, **config_overrides) -> "CogVLM2ForVideo":
        """Load a HF checkpoint directory (converted on the fly) or a converted MindSpore directory."""
        config = CogVLM2Config.from_hf_config(path, **config_overrides)
        model = cls(config)
        model.load_weights(path)
        return model

    def load_weights(self, directory: str):
        """Copy every parameter from a HF or converted checkpoint directory; any missing, unexpected
        or mis-shaped tensor is a CheckpointError naming it, so no parameter keeps its placeholder."""
        params = dict(self.parameters_and_names())
        layout = weights.checkpoint_layout(self)
        converted = weights.is_converted_dir(directory)
        # a converted directory stores the model's own layout, a HF one the PyTorch layout
        expected = {name: tuple(p.shape) if converted else layout[name][0] for name, p in params.items()}
        seen = set()
        for path, name, array in weights.iter_checkpoint(directory):
            weights.check_tensor(name, array.shape, expected, os.path.basename(path))
            if not converted:
                array = weights.to_model_layout(array, layout[name][1])
            param = params[name]
            param.set_data(Tensor(np.ascontiguousarray(array), dtype=param.dtype))
            seen.add(name)
        weights.check_complete(seen, expected, directory)

    # ----- vision --------------------------------------------------------------------------------
    def encode_video(self, pixel_values) -> Tensor:
        """Frames (T, 3, 224, 224) float32 -> vision embeddings (T, 66, hidden)."""
        pixels = np.asarray(pixel_values.asnumpy() if isinstance(pixel_values, Tensor) else pixel_values,
                            dtype=np.float32)
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (self.config.vision_config.in_channels, size, size):
            raise ValueError(f"pixel_values has shape {pixels.shape}; expected (T, 3, {size}, {size}) "
                             "from CogVLM2Processor")
        frames = [self.model.vision(Tensor(pixels[i:i + 1])) for i in range(len(pixels))]  # (1, 66, H) each
        return ops.concat(frames, 0) if len(frames) > 1 else frames[0]

    # ----- one forward pass ----------------------------------------------------------------------
    def _graph_inputs(self, input_ids, vision_embeds, token_type_ids, position_ids, bias) -> tuple:
        """numpy (B, L) inputs -> the step graph's first six Tensors. vision_embeds: (N, H) for the N
        VISION tokens in row-major order, or None."""
        flat_vision = np.flatnonzero(token_type_ids.reshape(-1) == VISION_TOKEN_TYPE)
        if vision_embeds is None:
            if flat_vision.size:
                raise ValueError(f"{flat_vision.size} VISION tokens in token_type_ids but no video given")
            vision_embeds = Tensor(np.zeros((0, self.config.hidden_size), np.float32),
                                   dtype=to_ms_dtype(self.config.compute_dtype))
        elif vision_embeds.shape[0] != flat_vision.size:
            raise ValueError(f"the video gives {vision_embeds.shape[0]} vision embeddings but token_type_ids "
                             f"marks {flat_vision.size} VISION tokens; build inputs with CogVLM2Processor")
        return (Tensor(input_ids.astype(np.int32)),
                vision_embeds,
                Tensor(flat_vision.reshape(-1, 1).astype(np.int32)),
                Tensor(vision_expert_mask(token_type_ids)),
                Tensor(position_ids.astype(np.int32)),
                Tensor(bias.astype(np.float32)))

    def run_step(self, input_ids: np.ndarray, vision_embeds, token_type_ids: np.ndarray,
                 position_ids: np.ndarray, bias: np.ndarray, past, logits_index: np.ndarray):
        """Run the compiled step. logits_index: flat positions b*L + l that need logits.
        Returns (logits (M, vocab) Tensor, new past)."""
        inputs = self._graph_inputs(input_ids, vision_embeds, token_type_ids, position_ids, bias)
        return self.step(*inputs, mutable(tuple(past)), Tensor(logits_index.reshape(-1, 1).astype(np.int32)))

    def hidden_states(self, input_ids, pixel_values=None, token_type_ids=None, position_ids=None,
                      vision_embeds=None) -> list:
        """Decoder hidden states for checking against the reference: [input embeddings (after the
        vision scatter), input of layers 1..n-1, final norm output], each (B, L, H) numpy."""
        ids, types, positions, mask = self._prepare(input_ids, token_type_ids, position_ids, None)
        vision_embeds = self._vision_rows(pixel_values, vision_embeds)
        inputs = self._graph_inputs(ids, vision_embeds, types, positions, causal_bias(mask, 0))
        return [h.asnumpy() for h in self.model.trace(*inputs)]

    def _vision_rows(self, pixel_values, vision_embeds):
        """Vision embeddings as (T*66, H) rows, encoding the frames if only pixel_values are given."""
        if vision_embeds is None and pixel_values is not None:
            vision_embeds = self.encode_video(pixel_values)
        if vision_embeds is None:
            return None
        if not isinstance(vision_embeds, Tensor):
            vision_embeds = Tensor(np.asarray(vision_embeds, np.float32),
                                   dtype=to_ms_dtype(self.config.compute_dtype))
        return vision_embeds.reshape(-1, self.config.hidden_size)

    def __call__(self, input_ids, pixel_values=None, token_type_ids=None, position_ids=None,
                 vision_embeds=None, attention_mask=None) -> Tensor:
        """Full forward pass: logits (B, L, vocab) float32 for every position."""
        ids, types, positions, mask = self._prepare(input_ids, token_type_ids, position_ids, attention_mask)
        vision_embeds = self._vision_rows(pixel_values, vision_embeds)
        b, length = ids.shape
        logits, _ = self.run_step(ids, vision_embeds, types, positions, causal_bias(mask, 0),
                                  self.empty_cache(b), np.arange(b * length))
        return logits.reshape(b, length, -1)

    # ----- generation ----------------------------------------------------------------------------
    def generate(self, input_ids, pixel_values=None, token_type_ids=None, position_ids=None,
                 attention_mask=None, vision_embeds=None, generation_config=None, on_tokens=None,
                 frame_indices=None, frames_per_sample=None, tokenizer=None, **options) -> GenerationOutput:
        """Generate with the KV cache from processor outputs (B, L), left-padded for batches, so
        ``model.generate(**processor(...), max_new_tokens=...)`` works (``frame_indices`` is
        informational; ``frames_per_sample`` is checked against ``pixel_values``).

        Options: max_new_tokens, max_length, do_sample, temperature, top_k, top_p,
        repetition_penalty, seed, stop_token_ids (or a GenerationConfig-like ``generation_config``).
        ``on_tokens(ids (B,))`` is called after each step. Returns a GenerationOutput whose
        ``new_tokens`` are the generated ids of each sample (no prompt echo) and, given a
        ``tokenizer``, whose ``texts`` are the decoded answers.
        """
        ids, types, positions, mask = self._prepare(input_ids, token_type_ids, position_ids, attention_mask)
        if frames_per_sample is not None and pixel_values is not None \
                and int(np.sum(frames_per_sample)) != len(pixel_values):
            raise ValueError(f"frames_per_sample sums to {int(np.sum(frames_per_sample))} but pixel_values "
                             f"holds {len(pixel_values)} frames; pass the processor's outputs unchanged")
        rows = self._vision_rows(pixel_values, vision_embeds)
        opts = GenerationOptions.from_kwargs(generation_config, **options)
        output = generation.generate(self, ids, types, positions, mask, rows, opts, on_tokens)
        if tokenizer is not None:
            output.texts = [tokenizer.decode(t, skip_special_tokens=True) for t in output.new_tokens]
        return output

    def chat(self, processor, query: str, video=None, history=None, stream: bool = False, **options):
        """Answer ``query`` about ``video`` (a path, frames, or None) after earlier ``history`` turns
        [(question, answer), ...]. Returns the answer text, or with ``stream=True`` an iterator of text
        pieces as tokens arrive. The frame embeddings of the last video are kept, so follow-up
        questions about the same video do not run the vision tower again."""
        num_frames, embeds = self._video_embeddings(processor, video)
        inputs = processor.build_inputs(query, num_frames, history)
        opts = GenerationOptions.from_kwargs(**options)
        tokens = generation.iter_tokens(self, inputs["input_ids"], inputs["token_type_ids"],
                                        inputs["position_ids"], inputs["attention_mask"], embeds, opts)
        pieces = generation.stream_text(processor.tokenizer, tokens, self._stop_ids(opts))
        return pieces if stream else "".join(pieces)

    def clear_video_cache(self):
        """Forget the frame embeddings kept by ``chat`` (the next turn re-encodes its video)."""
        object.__setattr__(self, "_last_video", None)

    def _stop_ids(self, options: GenerationOptions):
        return options.stop_token_ids if options.stop_token_ids is not None else self.config.stop_token_ids

    def _video_embeddings(self, processor, video):
        """(frame count, vision rows) for a chat turn, reusing the last video's embeddings."""
        if video is None:
            return None, None
        key = None
        if isinstance(video, (str, os.PathLike)):
            stat = os.stat(video)
            key = (os.path.realpath(video), stat.st_mtime_ns, stat.st_size, processor.frame_strategy,
                   processor.num_frames, processor.image_size)
            if self._last_video is not None and self._last_video[0] == key:
                return self._last_video[1], self._last_video[2]
            frames, _ = processor.load_video(video)
        else:
            frames = np.asarray(video)
        embeds = self._vision_rows(processor.transform(frames), None)
        object.__setattr__(self, "_last_video", (key, len(frames), embeds) if key else None)
        return len(frames), embeds

    def _prepare(self, input_ids, token_type_ids, position_ids, attention_mask):
        """numpy (B, L) arrays with defaults: all-language types, positions from the token types."""
        ids = _as_2d(input_ids, "input_ids")
        types = np.zeros_like(ids) if token_type_ids is None else _as_2d(token_type_ids, "token_type_ids")
        if position_ids is None:
            from cogvlm2.cogvlm2_processor import build_position_ids
            positions = np.stack([build_position_ids(row) for row in types])
        else:
            positions = _as_2d(position_ids, "position_ids")
        mask = np.ones_like(ids) if attention_mask is None else _as_2d(attention_mask, "attention_mask")
        for name, arr in (("token_type_ids", types), ("position_ids", positions), ("attention_mask", mask)):
            if arr.shape != ids.shape:
                raise ValueError(f"{name} has shape {arr.shape}, input_ids has {ids.shape}; they must match")
        return ids, types, positions, mask

    # ----- mindformers Trainer flow hooks (issue 5; the logic is in cogvlm2_mindformers.py) ------
    # MultiModalToTextGenerationTrainer builds this model without initial values, loads the
    # checkpoint with mindspore.load_param_into_net (HF directories through convert_weight_dict),
    # then calls init_parameters_data, which would silently fill missing weights with random values.
    def convert_name(self, weight_name: str):
        from cogvlm2.cogvlm2_mindformers import convert_name
        return convert_name(weight_name)

    def convert_weight_dict(self, source_dict, **kwargs):
        from cogvlm2.cogvlm2_mindformers import convert_weight_dict
        return convert_weight_dict(self, source_dict, **kwargs)

    def obtain_qkv_ffn_concat_keys(self):
        return None   # q, k and v are one fused tensor in the checkpoint already

    def init_parameters_data(self, auto_parallel_mode=False):
        from cogvlm2.cogvlm2_mindformers import check_parameters_loaded
        check_parameters_loaded(self)
        return super().init_parameters_data(auto_parallel_mode)


def _as_2d(x, name: str) -> np.ndarray:
    arr = x.asnumpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (B, L) or (L,), got shape {arr.shape}")
    return arr.astype(np.int64)


def causal_bias(attention_mask: np.ndarray, past_length: int) -> np.ndarray:
    """Additive bias (B, 1, L, past + L): query i (at absolute index past + i) sees key j when
    j <= past + i and attention_mask[b, j] == 1. attention_mask covers past + L keys, or only the
    L new ones when past_length == 0."""
    b, total = attention_mask.shape
    length = total - past_length
    query = np.arange(length)[:, None] + past_length
    key = np.arange(total)[None, :]
    allowed = (key <= query)[None] & (attention_mask[:, None, :] > 0)   # (B, L, S)
    return np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]
