"""Generation for CogVLM2ForVideo: prefill, then one token per step with the KV cache.

Options follow HF/mindformers ``GenerationConfig`` names (``max_new_tokens``, ``max_length``,
``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``) and the stop
list (eos 128001 and eot 128009 by default). Batches are left-padded; every row keeps the positions
it would have alone, so each sample's greedy answer equals its single run.
"""
import dataclasses
import time
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

__all__ = ["GenerationOptions", "GenerationOutput", "generate", "iter_tokens", "pick_next_tokens", "stream_text",
           "ContextLengthError"]


class ContextLengthError(ValueError):
    """The prompt plus the requested new tokens do not fit the model's context."""


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
            raise TypeError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")
        values.update({k: v for k, v in kwargs.items() if v is not None})
        options = cls(**values)
        options.validate()
        return options

    def validate(self):
        if self.temperature <= 0 and self.do_sample:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


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
    each step runs only the new token against the KV cache; without it, the whole sequence is run
    again every step (the reference's ``use_cache=False``; slow, for checking).
    """
    from cogvlm2.cogvlm2 import causal_bias
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
        if config.use_past:
            logits, past = model.run_step(tokens[:, None], None, language, next_position,
                                          causal_bias(mask, length - 1), past, np.arange(batch))
        else:
            logits, _ = model.run_step(ids, vision_embeds, types, positions, causal_bias(mask, 0),
                                       model.empty_cache(batch), np.arange(batch) * length + length - 1)


def new_token_budget(config, prompt_length: int, options: GenerationOptions) -> int:
    """How many tokens to generate; a ContextLengthError if they cannot fit."""
    context = config.max_position_embeddings
    max_length = min(options.max_length or context, context)
    max_new = options.max_new_tokens if options.max_new_tokens is not None else max_length - prompt_length
    if prompt_length + max_new > max_length or max_new < 1:
        raise ContextLengthError(
            f"the prompt has {prompt_length} tokens and {max_new} new tokens were asked for, but the "
            f"limit is {max_length} tokens (max_position_embeddings {context}); shorten the prompt, use "
            "fewer frames or lower max_new_tokens")
    return max_new


def generate(model, input_ids, token_type_ids, position_ids, attention_mask, vision_embeds,
             options: GenerationOptions, on_tokens: Optional[Callable[[np.ndarray], None]] = None
             ) -> GenerationOutput:
    """Run ``iter_tokens`` to the end; ``on_tokens(ids (B,))`` sees each step (for streaming)."""
    stop = list(options.stop_token_ids if options.stop_token_ids is not None else model.config.stop_token_ids)
    steps, scores = [], []
    start = time.perf_counter()
    first = None
    for tokens, logits in iter_tokens(model, input_ids, token_type_ids, position_ids, attention_mask,
                                      vision_embeds, options):
        if first is None:
            first = time.perf_counter()
        steps.append(tokens)
        if options.output_scores:
            scores.append(logits)
        if on_tokens is not None:
            on_tokens(tokens)
    end = time.perf_counter()
    generated = np.stack(steps, 1)                                      # (B, steps)
    new_tokens = []
    for row in generated:
        hits = np.flatnonzero(np.isin(row, stop))
        new_tokens.append(row[: hits[0] + 1] if hits.size else row)
    return GenerationOutput(new_tokens, scores=scores if options.output_scores else None,
                            prefill_seconds=first - start, decode_seconds=end - first)


def stream_text(tokenizer, tokens: Iterator[np.ndarray], stop_token_ids) -> Iterator[str]:
    """Text pieces of a single-sample token stream, whole UTF-8 characters only; ends at a stop token."""
    from cogvlm2.cogvlm2_tokenizer import StreamDecoder
    decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
    for step, _ in tokens:
        token = int(step[0])
        if token in stop_token_ids:
            break
        piece = decoder.push([token])
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
