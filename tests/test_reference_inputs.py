"""Inputs against the official implementation's own outputs for what the golden data lacks:
the base / vqa / chat templates with and without history, frame selection on videos of awkward
lengths and rates (made here by tests/video_recipes.py), and the position-id and expert-routing rules.
The expected values in fixtures/reference_inputs.json come from THUDM's code (see
fixtures/make_reference_data.py), never from this package."""
import json
import os
import warnings

import numpy as np
import pytest

from cogvlm2 import CogVLM2Processor, CogVLM2Tokenizer
from cogvlm2.cogvlm2_token_types import build_position_ids, vision_expert_mask
from cogvlm2.cogvlm2_video_io import base_frame_indices, chat_frame_indices
import video_recipes

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
with open(os.path.join(FIXTURES, "reference_inputs.json"), encoding="utf-8") as _handle:
    REFERENCE = json.load(_handle)
TEMPLATE_CASES = REFERENCE["templates"]
VIDEOS = REFERENCE["frames"]


@pytest.fixture(scope="module")
def tokenizer():
    return CogVLM2Tokenizer()


def _case_id(case):
    return f"{case['template']}-history_{case['history']}-{case['num_frames']}frames"


@pytest.mark.parametrize("case", TEMPLATE_CASES, ids=_case_id)
def test_template_inputs_equal_official(tokenizer, case):
    processor = CogVLM2Processor(tokenizer, template_version=case["template"])
    history = [tuple(turn) for turn in REFERENCE["histories"][case["history"]]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # base: "ignores the history"
        inputs = processor.build_inputs(REFERENCE["query"], num_frames=case["num_frames"], history=history)
    for key in ("input_ids", "token_type_ids", "position_ids"):
        assert inputs[key][0].tolist() == case[key], key


@pytest.mark.parametrize("row", REFERENCE["token_types"], ids=lambda r: "".join(map(str, r["token_type_ids"]))[:24])
def test_position_ids_and_expert_mask_equal_official(row):
    types = np.array(row["token_type_ids"])
    assert build_position_ids(types).tolist() == row["position_ids"]
    assert vision_expert_mask(types[None])[0].astype(int).tolist() == row["expert_mask"]


def test_expert_mask_of_a_batch_is_row_by_row():
    rows = [r["token_type_ids"] for r in REFERENCE["token_types"]]
    length = max(len(r) for r in rows)
    batch = np.array([[0] * (length - len(r)) + r for r in rows])      # left-padded with LANGUAGE
    mask = vision_expert_mask(batch)
    for i, row in enumerate(REFERENCE["token_types"]):
        assert mask[i, length - len(rows[i]):].astype(int).tolist() == row["expert_mask"]
        assert not mask[i, :length - len(rows[i])].any()


# ------------------------------------------------------------------------------------ frames
@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


@pytest.mark.parametrize("name", list(VIDEOS))
def test_frame_selection_equals_official(tokenizer, video_dir, name):
    expected = VIDEOS[name]
    path = video_recipes.make_video(name, video_dir / f"{name}.mp4")
    import decord   # after mindspore (imported by cogvlm2): see cogvlm2_video_io._decord
    reader = decord.VideoReader(path)
    # the recipe gives the timestamps the official selection saw (decord reports float32 seconds)
    assert len(reader) == expected["total_frames"]
    assert reader.get_avg_fps() == expected["avg_fps"]
    starts = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0]
    np.testing.assert_array_equal(starts, np.float32(expected["start_times"]))
    np.testing.assert_array_equal(starts, video_recipes.start_times(name).astype(np.float32))
    del reader

    for strategy in ("chat", "base"):
        processor = CogVLM2Processor(tokenizer, template_version=strategy)
        frames, indices = processor.load_video(path)
        assert indices.tolist() == expected[strategy], strategy
        levels = [video_recipes.grey_level(i) for i in expected[strategy]]
        # the frames selected (grey levels of neighbours are 37 apart; YUV conversion moves them by ~4)
        assert np.abs(frames.mean(axis=(1, 2, 3)) - levels).max() < 10, strategy


@pytest.mark.parametrize("name", list(VIDEOS))
def test_selection_functions_on_official_timestamps(name):
    expected = VIDEOS[name]
    starts = np.float32(expected["start_times"])
    assert chat_frame_indices(starts, 24).tolist() == expected["chat"]
    assert base_frame_indices(expected["total_frames"], expected["avg_fps"], 24).tolist() == expected["base"]
