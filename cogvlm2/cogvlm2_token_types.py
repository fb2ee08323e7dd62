"""What the processor, the decoder and generation share about a token sequence: the token types, the
position-id rule, the expert-routing rule and the causal attention bias. numpy only, no model.

- ``build_position_ids``: the official ``build_position_ids``. In every run of VISION tokens the first
  and last token count as language; the position rises by one on every language token and on the
  first interior token of a run; the interior of a run shares one position.
- ``vision_expert_mask``: the official ``get_expert_mask``: a VISION token goes to the vision expert
  when the next token is VISION too (so the last token of each run uses the language expert).
- ``causal_bias``: the additive attention bias for left-padded batches and a KV cache.
"""
import numpy as np

__all__ = ["LANGUAGE_TOKEN_TYPE", "VISION_TOKEN_TYPE", "MASK_VALUE", "build_position_ids", "vision_expert_mask",
           "causal_bias"]

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1
MASK_VALUE = -1e9   # additive attention bias for masked keys (finite: padded rows stay NaN-free)


def build_position_ids(token_type_ids) -> np.ndarray:
    """Position ids of one sequence from its token types, (L,) -> (L,) int64."""
    types = np.asarray(token_type_ids, dtype=np.int64).copy()
    if types.size == 0:
        return types
    vision, language = types == VISION_TOKEN_TYPE, types == LANGUAGE_TOKEN_TYPE
    # the first and the last token of each run of vision tokens (boi / eoi) count as language
    is_boi_eoi = np.zeros_like(vision)
    is_boi_eoi[1:] |= vision[1:] & language[:-1]
    is_boi_eoi[0] |= vision[0]
    is_boi_eoi[:-1] |= vision[:-1] & language[1:]
    is_boi_eoi[-1] |= vision[-1]
    types[is_boi_eoi] = LANGUAGE_TOKEN_TYPE
    # +1 on every language token and on the first interior token of a vision run
    language = types == LANGUAGE_TOKEN_TYPE
    steps = np.zeros_like(types)
    steps[1:] = language[1:] | ((types[1:] == VISION_TOKEN_TYPE) & language[:-1])
    return np.cumsum(steps)


def vision_expert_mask(token_type_ids: np.ndarray) -> np.ndarray:
    """Tokens routed to the vision expert, (B, L) int -> (B, L) float32 in {0, 1}."""
    tt = np.asarray(token_type_ids)
    mask = np.zeros(tt.shape, dtype=np.float32)
    mask[:, :-1] = (tt[:, :-1] == VISION_TOKEN_TYPE) & (tt[:, 1:] == VISION_TOKEN_TYPE)
    return mask


def causal_bias(attention_mask: np.ndarray, past_length: int) -> np.ndarray:
    """Additive bias (B, 1, L, past + L): query i (at absolute index past + i) sees key j when
    j <= past + i and attention_mask[b, j] == 1. attention_mask covers past + L keys, or only the
    L new ones when past_length == 0."""
    _, total = attention_mask.shape
    length = total - past_length
    query = np.arange(length)[:, None] + past_length
    key = np.arange(total)[None, :]
    allowed = (key <= query)[None] & (attention_mask[:, None, :] > 0)   # (B, L, S)
    return np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]
