"""CogVLM2Tokenizer against the real Llama 3 ids in tests/fixtures/tokenizer_cases.json."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cogvlm2 import CogVLM2Tokenizer, StreamDecoder
from cogvlm2.cogvlm2_errors import CogVLM2Error

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
with open(os.path.join(FIXTURES, "tokenizer_cases.json"), encoding="utf-8") as _handle:
    CASES_FILE = json.load(_handle)
CASES = CASES_FILE["cases"]


@pytest.fixture(scope="module")
def tokenizer():
    return CogVLM2Tokenizer()


def test_fixture_has_thirty_cases():
    assert len(CASES) == 30


@pytest.mark.parametrize("case", CASES, ids=[c["text"][:20] or "empty" for c in CASES])
def test_ids_and_round_trip_match_real_llama3(tokenizer, case):
    ids = tokenizer.encode(case["text"])
    assert ids == case["ids"]
    assert tokenizer.decode(ids) == case["text"] == case["decoded"]
    assert [tokenizer.decode_bytes([i]) for i in ids] == [bytes.fromhex(h) for h in case["token_bytes_hex"]]


@pytest.mark.parametrize("case", CASES, ids=[c["text"][:20] or "empty" for c in CASES])
def test_allow_special_matches_hf_fast_tokenizer(tokenizer, case):
    assert tokenizer.encode(case["text"], allow_special=True) == case["hf_fast_ids"]


def test_special_ids(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (128000, 128001)
    assert (tokenizer.pad_token_id, tokenizer.eot_token_id) == (128002, 128009)
    assert tokenizer.bos_token_id == CASES_FILE["bos_token_id"]
    assert tokenizer.stop_token_ids == [128001, 128009]
    assert tokenizer.vocab_size == 128000 + CASES_FILE["n_special"] == 128256
    for name, token_id in CASES_FILE["special_tokens_first_ids"].items():
        assert tokenizer.token_to_id(name) == token_id
    assert tokenizer.token_to_id("<|reserved_special_token_250|>") == 128255


def test_special_text_is_plain_by_default(tokenizer):
    ids = tokenizer.encode("<|eot_id|>")
    assert tokenizer.eot_token_id not in ids
    assert tokenizer.encode("<|eot_id|>", allow_special=True) == [128009]


def test_decode_special_and_skip(tokenizer):
    ids = [128000, 9906, 11, 1917, 0, 128009]
    assert tokenizer.decode(ids) == "<|begin_of_text|>Hello, world!<|eot_id|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello, world!"
    assert tokenizer.decode(np.array([ids])) == tokenizer.decode(ids)  # numpy (1, L) accepted
    assert tokenizer.batch_decode([ids, ids[1:3]], skip_special_tokens=True) == ["Hello, world!", "Hello,"]


def test_decode_rejects_ids_outside_vocabulary(tokenizer):
    with pytest.raises(ValueError, match=r"128256.*outside the vocabulary"):
        tokenizer.decode([1, 128256])
    with pytest.raises(ValueError, match="batch_decode"):
        tokenizer.decode(np.zeros((2, 3), dtype=np.int64))


def test_convert_ids_to_tokens_and_call(tokenizer):
    assert tokenizer.convert_ids_to_tokens([9906, 11, 128009]) == ["Hello", ",", "<|eot_id|>"]
    assert tokenizer("Hello, world!") == {"input_ids": [9906, 11, 1917, 0], "attention_mask": [1, 1, 1, 1]}
    assert tokenizer(["Hi"], add_special_tokens=True)["input_ids"] == [[128000, 13347]]


def test_stream_decoder_holds_back_split_characters(tokenizer):
    case = next(c for c in CASES if c["text"].startswith("Emoji"))
    stream = StreamDecoder(tokenizer)
    pieces = [stream.push([token_id]) for token_id in case["ids"]]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + stream.flush() == case["text"]
    assert pieces[2] == "" and pieces[4] == "🎉"  # 🎉 is split over three tokens


def test_stream_decoder_skips_specials_and_flushes_incomplete(tokenizer):
    stream = StreamDecoder(tokenizer)  # skip_special_tokens=True by default
    assert stream.push([128000, 9906]) == "Hello"
    assert stream.push([9468]) == ""  # first bytes of a 4-byte character
    assert stream.flush() == "\ufffd"


def test_missing_vocab_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(CogVLM2Error, match="nope"):
        CogVLM2Tokenizer(vocab_file=str(missing))


def test_wrong_vocab_format_is_explained(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE"}}\n')
    with pytest.raises(ValueError, match=r"line 1 .*not a tiktoken tokenizer.model"):
        CogVLM2Tokenizer(vocab_file=str(bad))


def test_registered_with_mindformers():
    from mindformers.models.build_tokenizer import build_tokenizer
    tokenizer = build_tokenizer({"type": "CogVLM2Tokenizer"})
    assert isinstance(tokenizer, CogVLM2Tokenizer)
    assert tokenizer.encode("Hello, world!") == [9906, 11, 1917, 0]


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_and_streaming_property(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    stream = StreamDecoder(tokenizer, skip_special_tokens=False)
    assert "".join(stream.push([i]) for i in ids) + stream.flush() == text
