"""Llama 3 tiktoken tokenizer used by CogVLM2-Video.

The vocabulary is Llama 3's ``tokenizer.model``: 128000 BPE ranks, one ``<base64 bytes> <rank>`` per
line, split with the Llama 3 pre-tokenizer pattern, followed by 256 special tokens 128000..128255 with
the Llama 3 names (``<|begin_of_text|>``, ``<|end_of_text|>``, ``<|reserved_special_token_0..3|>``,
``<|start_header_id|>``, ``<|end_header_id|>``, ``<|reserved_special_token_4|>``, ``<|eot_id|>``,
``<|reserved_special_token_5..250|>``).

When no ``vocab_file`` is given, the tokenizer uses the identical file that Meta's ``llama-models``
package ships (``llama_models/llama3/tokenizer.model``), so no gated download is needed.

Encoding treats special-looking text such as ``"<|eot_id|>"`` as plain text by default, so a user's
question cannot inject control tokens; ``encode(text, allow_special=True)`` maps such text to the
special ids instead (what a Hugging Face fast tokenizer does).

Streaming: one token can end in the middle of a multi-byte UTF-8 character (emoji and many CJK
characters span two or three tokens). ``decode_bytes(ids)`` returns the raw bytes, and
``StreamDecoder`` turns a stream of ids into text pieces that only ever contain complete characters::

    stream = StreamDecoder(tokenizer)
    for token_id in generated_ids:
        print(stream.push([token_id]), end="", flush=True)
    print(stream.flush())
"""
import codecs
import functools
import importlib.util
import os
from base64 import b64decode
from binascii import Error as Base64Error
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import tiktoken
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from cogvlm2.cogvlm2_errors import CogVLM2ConfigError, CogVLM2InputError

# Llama 3's pre-tokenizer split pattern (identical in Meta's llama3 tokenizer and in HF's conversion).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Named special tokens, in id order from the first special id; the rest are reserved tokens.
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
)
_FIRST_UNNAMED_RESERVED = 5


def llama3_special_tokens(num_special_tokens: int = 256) -> List[str]:
    """The Llama 3 special token names, in id order."""
    if num_special_tokens < len(LLAMA3_NAMED_SPECIAL_TOKENS):
        raise CogVLM2ConfigError(f"num_special_tokens={num_special_tokens} is too small: Llama 3 defines "
                         f"{len(LLAMA3_NAMED_SPECIAL_TOKENS)} named special tokens (256 in the real vocabulary)")
    n_reserved = num_special_tokens - len(LLAMA3_NAMED_SPECIAL_TOKENS)
    reserved = [f"<|reserved_special_token_{_FIRST_UNNAMED_RESERVED + i}|>" for i in range(n_reserved)]
    return list(LLAMA3_NAMED_SPECIAL_TOKENS) + reserved


def default_vocab_file() -> str:
    """Path of the Llama 3 ``tokenizer.model`` shipped by the ``llama-models`` package."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "CogVLM2Tokenizer needs a Llama 3 tokenizer.model: install it with `pip install llama-models` "
            "(it ships the identical file) or pass vocab_file=/path/to/tokenizer.model")
    path = os.path.join(list(spec.submodule_search_locations)[0], "llama3", "tokenizer.model")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the llama-models package has no {path}: reinstall it "
                                "(`pip install --force-reinstall llama-models`) or pass vocab_file=...")
    return path


def load_tiktoken_ranks(path: str) -> Dict[bytes, int]:
    """Read a tiktoken BPE file: one ``<base64 token bytes> <rank>`` pair per line."""
    if not os.path.isfile(path):
        raise CogVLM2ConfigError(f"tokenizer vocab_file not found: {path!r}. Point vocab_file at a Llama 3 "
                                "tokenizer.model, or leave it unset to use the copy from llama-models")
    ranks = {}
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[b64decode(token, validate=True)] = int(rank)
            except (ValueError, Base64Error):
                raise CogVLM2ConfigError(f"{path!r} line {line_no} is not '<base64 token> <rank>': this is not a "
                                 "tiktoken tokenizer.model (a sentencepiece or HF tokenizer.json file will "
                                 "not work); use Llama 3's tokenizer.model") from None
    return ranks


@functools.lru_cache(maxsize=4)
def _load_encoding(path: str, num_special_tokens: int) -> Tuple[tiktoken.Encoding, Dict[str, int]]:
    """(tiktoken encoding, special token name -> id); cached because reading the file takes ~0.2 s."""
    ranks = load_tiktoken_ranks(path)
    first_special = len(ranks)
    special = {name: first_special + i for i, name in enumerate(llama3_special_tokens(num_special_tokens))}
    encoding = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN,
                                 mergeable_ranks=ranks, special_tokens=special)
    return encoding, special


def _as_id_list(ids) -> List[int]:
    """Accept a list, numpy array or MindSpore Tensor of token ids (one sequence)."""
    if hasattr(ids, "asnumpy"):
        ids = ids.asnumpy()
    array = np.asarray(ids)
    if array.ndim > 1:
        if array.shape[0] != 1:
            raise CogVLM2InputError(f"decode takes one sequence of ids, got shape {array.shape}: use batch_decode")
        array = array[0]
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise CogVLM2InputError(f"token ids must be integers, got dtype {array.dtype}")
    return [int(i) for i in array.reshape(-1)]


@MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
class CogVLM2Tokenizer:
    """CogVLM2-Video's tokenizer: Llama 3 tiktoken BPE with 256 special tokens.

    Args:
        vocab_file: a Llama 3 ``tokenizer.model``; ``None`` uses the copy in the ``llama-models`` package.
        bos_token, eos_token, pad_token, eot_token: names of the special tokens used as
            begin-of-text (128000), end-of-text (128001), padding / video placeholder (128002) and
            end-of-turn (128009).
        num_special_tokens: how many special tokens follow the BPE ranks (256 in Llama 3).
        add_bos_token: whether ``__call__`` prepends bos (``encode`` never does).
        **kwargs: other keys found in mindformers YAML files; kept in ``init_kwargs``, otherwise unused.
    """

    # vocab_file is optional (see default_vocab_file): mindformers' build_tokenizer must not require it.
    vocab_files_names: Dict[str, str] = {}

    def __init__(self, vocab_file: Optional[str] = None, bos_token: str = "<|begin_of_text|>",
                 eos_token: str = "<|end_of_text|>", pad_token: str = "<|reserved_special_token_0|>",
                 eot_token: str = "<|eot_id|>", num_special_tokens: int = 256, add_bos_token: bool = False,
                 **kwargs):
        self.vocab_file = os.path.abspath(vocab_file) if vocab_file else default_vocab_file()
        self._encoding, special_tokens = _load_encoding(self.vocab_file, num_special_tokens)
        self.special_tokens: Dict[str, int] = dict(special_tokens)
        self.num_base_tokens = self._encoding.n_vocab - len(self.special_tokens)
        self.bos_token, self.eos_token, self.pad_token, self.eot_token = bos_token, eos_token, pad_token, eot_token
        self.add_bos_token = add_bos_token
        self.init_kwargs = dict(vocab_file=vocab_file, bos_token=bos_token, eos_token=eos_token,
                                pad_token=pad_token, eot_token=eot_token,
                                num_special_tokens=num_special_tokens, add_bos_token=add_bos_token, **kwargs)
        for name in (bos_token, eos_token, pad_token, eot_token):
            self.token_to_id(name)  # fail early on a misspelt special token name

    # ----------------------------------------------------------------- ids of special tokens
    def token_to_id(self, special_token: str) -> int:
        """Id of a special token such as ``"<|eot_id|>"``."""
        if special_token not in self.special_tokens:
            raise CogVLM2InputError(f"{special_token!r} is not a special token of this tokenizer; Llama 3 names look "
                             "like '<|eot_id|>' or '<|reserved_special_token_0|>'")
        return self.special_tokens[special_token]

    @property
    def bos_token_id(self) -> int:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(self.pad_token)

    @property
    def eot_token_id(self) -> int:
        return self.token_to_id(self.eot_token)

    @property
    def stop_token_ids(self) -> List[int]:
        """Generation stops on end-of-text or end-of-turn."""
        return [self.eos_token_id, self.eot_token_id]

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def __len__(self) -> int:
        return self.vocab_size

    # ----------------------------------------------------------------- encode / decode
    def encode(self, text: str, allow_special: bool = False) -> List[int]:
        """Token ids of ``text`` (no bos).

        With ``allow_special=False`` (default) text like ``"<|eot_id|>"`` is encoded as ordinary
        characters; with ``True`` it becomes the special token id.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        allowed = "all" if allow_special else set()
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def decode_bytes(self, ids, skip_special_tokens: bool = False) -> bytes:
        """The raw UTF-8 bytes of ``ids``; may end inside a multi-byte character."""
        id_list = self._checked_ids(ids)
        if skip_special_tokens:
            id_list = [i for i in id_list if i < self.num_base_tokens]
        return self._encoding.decode_bytes(id_list)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def batch_decode(self, sequences: Iterable, skip_special_tokens: bool = False) -> List[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def convert_ids_to_tokens(self, ids) -> List[str]:
        """Each id's token text (special names as is; bytes that are not whole UTF-8 as ``\\xNN``)."""
        pieces = self._encoding.decode_tokens_bytes(self._checked_ids(ids))
        return [piece.decode("utf-8", errors="backslashreplace") for piece in pieces]

    def __call__(self, text, add_special_tokens: Optional[bool] = None) -> Dict[str, list]:
        """HF-style ``{"input_ids", "attention_mask"}`` for one string or a list of strings (no padding)."""
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        texts = [text] if isinstance(text, str) else list(text)
        ids = [([self.bos_token_id] if add_bos else []) + self.encode(t) for t in texts]
        if isinstance(text, str):
            return {"input_ids": ids[0], "attention_mask": [1] * len(ids[0])}
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}

    def _checked_ids(self, ids) -> List[int]:
        id_list = _as_id_list(ids)
        bad = [i for i in id_list if not 0 <= i < self.vocab_size]
        if bad:
            raise CogVLM2InputError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}): "
                             "were they produced by a model with another vocabulary?")
        return id_list

    def __repr__(self) -> str:
        return f"CogVLM2Tokenizer(vocab_file={self.vocab_file!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenizer for streaming generation.

    ``push(ids)`` returns the text completed by these ids; bytes of a character that is not complete
    yet are held back until the next push. ``flush()`` returns what is left (an incomplete character
    becomes U+FFFD). Concatenating every returned piece equals ``tokenizer.decode(all_ids)``
    (with the same ``skip_special_tokens``).
    """

    def __init__(self, tokenizer: CogVLM2Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        data = self.tokenizer.decode_bytes(ids, self.skip_special_tokens)
        return self._utf8.decode(data)

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
