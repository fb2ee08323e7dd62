"""Generation for CogVLM2ForVideo: prefill, then one token per step with the KV cache.

``generate(model, **processor_outputs, max_new_tokens=...)`` runs one static batch to the end (the
mindformers pipeline and the tests use it); ``cogvlm2_engine`` serves many requests at once with the
same pieces (``GenerationOptions``, ``pick_next_tokens``, ``new_token_budget``). This module imports
no model: it is handed one.

Options follow HF/mindformers ``GenerationConfig`` names (``max_new_tokens``, ``max_length``,
``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``) and the stop
list (eos 128001 and eot 128009 by default). Batches are left-padded; every row keeps the positions
it would have alone, so each sample's greedy answer equals its single run.
"""
import dataclasses
import time
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from cogvlm2.cogvlm2_errors import CogVLM2InputError, ContextLengthError, GenerationOptionError
from cogvlm2.cogvlm2_kv_cache import SlotKVCache
from cogvlm2.cogvlm2_token_types import causal_bias

__all__ = ["GenerationOptions", "GenerationOutput", "generate", "iter_tokens", "pick_next_tokens", "stream_text",
           "new_token_budget", "generation_defaults", "GENERATION_KEYS", "ContextLengthError"]


@dataclasses.dataclass
class GenerationOptions:
    max_new_tokens: Optional[int] = None   # default: fill max_length
    max_length: Optional[int] = None       # prompt + new tokens; default: the model's context
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0                          # 0: no top-k filter (greedy ignores it)
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Optional[Sequence[int]] = None
    output_scores: bool = False            # keep each step's logits (B, vocab) in the output

    @classmethod
    def from_kwargs(cls, generation_config=None, **kwargs) -> "GenerationOptions":
        """Build from keyword arguments and/or a (mindformers/HF) GenerationConfig-like object."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        if generation_config is not None:
            for name in names:
                value = getattr(generation_config, name, None)
                if value is not None:
                    values[name] = value
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise GenerationOptionError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")
        values.update({k: v for k, v in kwargs.items() if v is not None})
        options = cls(**values)
        options.validate()
        return options

    def validate(self):
        """Types and ranges of every option; a GenerationOptionError names the option and the rule."""
        _check(self.max_new_tokens is None or _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
               "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.max_length is None or _is_int(self.max_length) and self.max_length >= 1,
               "max_length", self.max_length, "an integer >= 1")
        _check(isinstance(self.do_sample, (bool, np.bool_)), "do_sample", self.do_sample, "true or false")
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a number >= 0")
        _check(not self.do_sample or self.temperature > 0, "temperature", self.temperature,
               "> 0 when sampling (do_sample); use do_sample false for greedy decoding")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
               self.repetition_penalty, "a number > 0")
        _check(self.seed is None or _is_int(self.seed) and self.seed >= 0, "seed", self.seed,
               "an integer >= 0")
        _check(self.stop_token_ids is None or not isinstance(self.stop_token_ids, (str, bytes))
               and all(_is_int(i) and i >= 0 for i in _iterable(self.stop_token_ids)),
               "stop_token_ids", self.stop_token_ids, "a list of token ids (integers >= 0)")
        _check(isinstance(self.output_scores, (bool, np.bool_)), "output_scores", self.output_scores,
               "true or false")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating)) and np.isfinite(value)


def _iterable(value):
    try:
        return list(value)
    except TypeError:
        return [None]


def _check(ok: bool, name: str, value, rule: str):
    if not ok:
        raise GenerationOptionError(f"{name} must be {rule}, got {value!r}")


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


@dataclasses.dataclass
class GenerationOutput:
    """new_tokens: per sample, the generated ids, no prompt echo (a stop token, if reached, is the
    last one). texts: the decoded answers, when generate was given a tokenizer.
    scores: with ``output_scores``, the logits (B, vocab) each step's token was chosen from."""
    new_tokens: List[np.ndarray]
    texts: Optional[List[str]] = None
    scores: Optional[List[np.ndarray]] = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(t) for t in self.new_tokens) - 1
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0


def pick_next_tokens(logits: np.ndarray, options: GenerationOptions, history: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Choose one token per row from logits (B, vocab). history (B, n): ids seen so far (for the
    repetition penalty)."""
    if options.repetition_penalty != 1.0:
        logits = logits.astype(np.float32, copy=True)
        rows = np.arange(logits.shape[0])[:, None]
        seen = logits[rows, history]
        logits[rows, history] = np.where(seen > 0, seen / options.repetition_penalty,
                                         seen * options.repetition_penalty)
    if not options.do_sample:
        return logits.argmax(-1)
    logits = logits / options.temperature
    if options.top_k:
        k = min(options.top_k, logits.shape[-1])
        kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if options.top_p < 1.0:
        order = np.argsort(-logits, axis=-1)
        sorted_logits = np.take_along_axis(logits, order, -1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop_sorted = np.cumsum(probs, -1) - probs >= options.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits = np.where(drop, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def iter_tokens(model, input_ids: np.ndarray, token_type_ids: np.ndarray, position_ids: np.ndarray,
                attention_mask: np.ndarray, vision_embeds, options: GenerationOptions) -> Iterator[np.ndarray]:
    """Greedy or sampled decoding: yields, one step at a time, the new token of every row (B,) int64
    (the pad id for rows that already stopped) and the logits (B, vocab) it came from.

    All inputs are (B, L) numpy arrays, left-padded (attention_mask 0 on padding); vision_embeds holds
    the rows for the VISION tokens in row-major order, or None. With ``config.use_past`` (default)
    each step runs only the new token against the KV cache: the slot cache when the model has the slot
    decode step (``kv_cache``: each row's prompt without its padding in a slot of its own), else the
    functional cache; without it, the whole sequence is run again every step (the reference's
    ``use_cache=False``; slow, for checking).
    """
    config = model.config
    batch, prompt_length = input_ids.shape
    max_new = new_token_budget(config, prompt_length, options)
    stop = np.array(list(options.stop_token_ids if options.stop_token_ids is not None
                         else config.stop_token_ids), dtype=np.int64)
    rng = np.random.default_rng(options.seed)

    ids, types = input_ids.astype(np.int64), token_type_ids.astype(np.int64)
    positions, mask = position_ids.astype(np.int64), attention_mask.astype(np.int64)
    last = np.arange(batch) * prompt_length + prompt_length - 1          # flat index of each last token
    logits, past = model.run_step(ids, vision_embeds, types, positions, causal_bias(mask, 0),
                                  model.empty_cache(batch), last)
    slots, cache_positions = None, None
    if config.use_past and model.slot_step is not None:                # decode on the slot cache
        slots = SlotKVCache(config, batch)
        arrays = [t.asnumpy() for t in past]
        cache_positions = np.array([slots.store(b, arrays, b, np.flatnonzero(mask[b])) for b in range(batch)])
        past = None
    finished = np.zeros(batch, dtype=bool)
    language = np.zeros((batch, 1), dtype=np.int64)
    for step in range(max_new):
        logits = logits.asnumpy()
        tokens = pick_next_tokens(logits, options, ids, rng)
        tokens = np.where(finished, config.pad_token_id, tokens)
        yield tokens, logits
        finished |= np.isin(tokens, stop)
        if finished.all() or step == max_new - 1:
            return
        next_position = positions.max(-1, keepdims=True) + 1            # (B, 1)
        ids = np.concatenate([ids, tokens[:, None]], 1)
        types = np.concatenate([types, language], 1)
        positions = np.concatenate([positions, next_position], 1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], 1)
        length = ids.shape[1]
        if slots is not None:
            logits = model.run_slot_step(tokens[:, None], next_position, slots, np.arange(batch), cache_positions)
            cache_positions = cache_positions + 1
        elif config.use_past:
            logits, past = model.run_step(tokens[:, None], None, language, next_position,
                                          causal_bias(mask, length - 1), past, np.arange(batch))
        else:
            logits, _ = model.run_step(ids, vision_embeds, types, positions, causal_bias(mask, 0),
                                       model.empty_cache(batch), np.arange(batch) * length + length - 1)


def new_token_budget(config, prompt_length: int, options: GenerationOptions) -> int:
    """How many tokens to generate; a ContextLengthError if they cannot fit (options are validated)."""
    context = config.max_position_embeddings
    max_length = min(options.max_length or context, context)
    max_new = options.max_new_tokens if options.max_new_tokens is not None else max_length - prompt_length
    if prompt_length + max_new > max_length or max_new < 1:
        raise ContextLengthError(
            f"the prompt has {prompt_length} tokens and {max_new} new tokens were asked for, but the "
            f"limit is {max_length} tokens (max_position_embeddings {context}); shorten the prompt, use "
            "fewer frames or lower max_new_tokens")
    return max_new


def generate(model, input_ids, pixel_values=None, token_type_ids=None, position_ids=None, attention_mask=None,
             vision_embeds=None, generation_config=None, on_tokens=None, frame_indices=None,
             frames_per_sample=None, tokenizer=None, **options) -> GenerationOutput:
    """Generate with the KV cache from processor outputs (B, L), left-padded for batches, so
    ``generate(model, **processor(...), max_new_tokens=...)`` works (``frame_indices`` is
    informational; ``frames_per_sample`` is checked against ``pixel_values``).

    Options: max_new_tokens, max_length, do_sample, temperature, top_k, top_p, repetition_penalty,
    seed, stop_token_ids, output_scores (or a GenerationConfig-like ``generation_config``).
    ``on_tokens(ids (B,))`` is called after each step. Returns a GenerationOutput whose ``new_tokens``
    are the generated ids of each sample (no prompt echo) and, given a ``tokenizer``, whose ``texts``
    are the decoded answers.
    """
    del frame_indices
    ids, types, positions, mask = model.prepare_inputs(input_ids, token_type_ids, position_ids, attention_mask)
    if frames_per_sample is not None and pixel_values is not None \
            and int(np.sum(frames_per_sample)) != len(pixel_values):
        raise CogVLM2InputError(f"frames_per_sample sums to {int(np.sum(frames_per_sample))} but pixel_values "
                                f"holds {len(pixel_values)} frames; pass the processor's outputs unchanged")
    rows = model.vision_rows(pixel_values, vision_embeds)
    opts = GenerationOptions.from_kwargs(generation_config, **options)
    stop = list(opts.stop_token_ids if opts.stop_token_ids is not None else model.config.stop_token_ids)
    steps, scores = [], []
    start = time.perf_counter()
    first = None
    for tokens, logits in iter_tokens(model, ids, types, positions, mask, rows, opts):
        if first is None:
            first = time.perf_counter()
        steps.append(tokens)
        if opts.output_scores:
            scores.append(logits)
        if on_tokens is not None:
            on_tokens(tokens)
    end = time.perf_counter()
    generated = np.stack(steps, 1)                                      # (B, steps)
    new_tokens = []
    for row in generated:
        hits = np.flatnonzero(np.isin(row, stop))
        new_tokens.append(row[: hits[0] + 1] if hits.size else row)
    output = GenerationOutput(new_tokens, scores=scores if opts.output_scores else None,
                              prefill_seconds=first - start, decode_seconds=end - first)
    if tokenizer is not None:
        output.texts = [tokenizer.decode(t, skip_special_tokens=True) for t in output.new_tokens]
    return output


def stream_text(tokenizer, token_ids: Iterator[int], stop_token_ids) -> Iterator[str]:
    """Text pieces of one sequence's token ids as they arrive, whole UTF-8 characters only; ends
    before a stop token."""
    from cogvlm2.cogvlm2_tokenizer import StreamDecoder
    decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
    for token in token_ids:
        if token in stop_token_ids:
            break
        piece = decoder.push([int(token)])
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
