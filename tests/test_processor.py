"""CogVLM2Processor against the official implementation's outputs (tests/fixtures/tiny_chat/golden.npz),
frame selection on synthetic videos, and the errors for bad inputs."""
import json
import os
import struct

import cv2
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cogvlm2 import CogVLM2InputError, CogVLM2Processor, CogVLM2Tokenizer
from cogvlm2.cogvlm2_processor import build_prompt
from cogvlm2.cogvlm2_token_types import build_position_ids
from cogvlm2.cogvlm2_video_io import base_frame_indices, chat_frame_indices

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
VIDEO = os.path.join(FIXTURES, "bigbuckbunny.mp4")
GOLDEN = dict(np.load(os.path.join(FIXTURES, "tiny_chat", "golden.npz")))
with open(os.path.join(FIXTURES, "tiny_chat", "meta.json"), encoding="utf-8") as _handle:
    META = json.load(_handle)
PROMPT = META["prompt"]  # "Please describe this video."
HISTORY = [("What animal is shown?", "A big rabbit.")]
HIST_QUERY = "What happens next?"
TEXT_KEYS = ("input_ids", "token_type_ids", "position_ids")


# ------------------------------------------------------------------------------------ helpers
def write_video(path, seconds, fps=25, size=(64, 48), level=lambda frame, fps: 0):
    """A small mp4v video; every frame is one flat grey level(frame, fps)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for frame in range(int(round(seconds * fps))):
        writer.write(np.full((size[1], size[0], 3), level(frame, fps), dtype=np.uint8))
    writer.release()
    return str(path)


def mp4_atoms(data, start=0, end=None):
    """(type, offset, size) of the MP4 boxes in data[start:end]."""
    offset, end = start, len(data) if end is None else end
    while offset < end:
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        yield kind, offset, size
        offset += size


def faststart(data):
    """Move the moov box before the media data (as web videos are), fixing the chunk offsets."""
    top = list(mp4_atoms(data))
    _, moov_at, moov_size = next(a for a in top if a[0] == b"moov")
    moov = bytearray(data[moov_at:moov_at + moov_size])

    def shift_chunk_offsets(start, end):
        for kind, offset, size in mp4_atoms(moov, start, end):
            if kind in (b"trak", b"mdia", b"minf", b"stbl"):
                shift_chunk_offsets(offset + 8, offset + size)
            elif kind == b"stco":
                count = struct.unpack(">I", moov[offset + 12:offset + 16])[0]
                for k in range(count):
                    at = offset + 16 + 4 * k
                    moov[at:at + 4] = struct.pack(">I", struct.unpack(">I", moov[at:at + 4])[0] + moov_size)

    shift_chunk_offsets(8, moov_size)
    media_at = next(offset for kind, offset, _ in top if kind == b"mdat")
    media = b"".join(data[o:o + s] for kind, o, s in top if kind != b"moov" and o >= media_at)
    return data[:media_at] + bytes(moov) + media


def torch_bilinear_reference(image, out_h, out_w):
    """Direct float32 transcription of torch's upsample_bilinear2d (align_corners=False), (H, W, C)."""
    def taps(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        lam = np.clip(src - i0, 0, 1).astype(np.float32)
        return i0, np.minimum(i0 + 1, n_in - 1), lam
    out = np.zeros((out_h, out_w, image.shape[2]), np.float32)
    ys, xs = taps(image.shape[0], out_h), taps(image.shape[1], out_w)
    for oy in range(out_h):
        for ox in range(out_w):
            (y0, y1, ly), (x0, x1, lx) = (ys[0][oy], ys[1][oy], ys[2][oy]), (xs[0][ox], xs[1][ox], xs[2][ox])
            top = image[y0, x0] * (1 - lx) + image[y0, x1] * lx
            bottom = image[y1, x0] * (1 - lx) + image[y1, x1] * lx
            out[oy, ox] = top * (1 - ly) + bottom * ly
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return CogVLM2Tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return CogVLM2Processor(tokenizer)


@pytest.fixture(scope="module")
def main_inputs(processor):
    return processor(text=PROMPT, video=VIDEO)


# ------------------------------------------------------------------------------------ golden parity
def test_main_case_equals_golden(main_inputs):
    for key in TEXT_KEYS + ("attention_mask",):
        assert main_inputs[key].dtype == np.int64 and main_inputs[key].shape == (1, META["seq_len"])
        np.testing.assert_array_equal(main_inputs[key][0], GOLDEN[key], err_msg=key)
    np.testing.assert_array_equal(main_inputs["frame_indices"], GOLDEN["frame_indices"])


def test_pixel_values_match_golden(main_inputs):
    pixels = main_inputs["pixel_values"]
    assert pixels.dtype == np.float32 and pixels.shape == (META["T"], 3, 224, 224)
    # 2.4e-6: 10x the 2.4e-7 this code achieves (values up to 2.1); decoding is deterministic (decord)
    assert np.abs(pixels - GOLDEN["pixel_values"]).max() <= 2.4e-6


def test_history_case_equals_golden(processor):
    inputs = processor(text=HIST_QUERY, video=VIDEO, history=HISTORY)
    for key in TEXT_KEYS:
        np.testing.assert_array_equal(inputs[key][0], GOLDEN["hist_" + key], err_msg=key)


def test_text_only_case_equals_golden(processor):
    inputs = processor(text=PROMPT)
    for key in TEXT_KEYS:
        np.testing.assert_array_equal(inputs[key][0], GOLDEN["text_" + key], err_msg=key)
    assert inputs["pixel_values"] is None and inputs["frame_indices"] is None


def test_build_inputs_from_frame_count_needs_no_video(processor, main_inputs):
    inputs = processor.build_inputs(HIST_QUERY, num_frames=META["T"], history=HISTORY)
    for key in TEXT_KEYS:
        np.testing.assert_array_equal(inputs[key][0], GOLDEN["hist_" + key], err_msg=key)
    again = processor.build_inputs(PROMPT, META["T"])
    for key in TEXT_KEYS + ("attention_mask",):
        np.testing.assert_array_equal(again[key], main_inputs[key])


def test_chat_selection_on_golden_timestamps():
    start_times = GOLDEN["video_timestamps"][:, 0].astype(np.float32)  # decord gives float32
    np.testing.assert_array_equal(chat_frame_indices(start_times, 24), GOLDEN["frame_indices"])


def test_query_list_forms_equal_keyword_form(processor, main_inputs):
    query = [{"video": VIDEO}, {"text": PROMPT}]
    for inputs in (processor(query), processor(query_list=query)):
        for key in TEXT_KEYS + ("attention_mask", "frame_indices"):
            np.testing.assert_array_equal(inputs[key], main_inputs[key], err_msg=key)
        np.testing.assert_array_equal(inputs["pixel_values"], main_inputs["pixel_values"])


def test_batch_is_left_padded_and_frames_concatenated(processor, main_inputs):
    batch = processor([[{"text": PROMPT}], [{"video": VIDEO}, {"text": PROMPT}]])
    length = META["seq_len"]
    assert batch["input_ids"].shape == (2, length)
    np.testing.assert_array_equal(batch["frames_per_sample"], [0, META["T"]])
    np.testing.assert_array_equal(batch["pixel_values"], main_inputs["pixel_values"])
    n_text = META["text_seq_len"]
    for key in TEXT_KEYS:
        np.testing.assert_array_equal(batch[key][0, -n_text:], GOLDEN["text_" + key])
        np.testing.assert_array_equal(batch[key][1], main_inputs[key][0])
    assert batch["attention_mask"][0].tolist() == [0] * (length - n_text) + [1] * n_text
    assert set(batch["input_ids"][0, :length - n_text].tolist()) == {128002}


# ------------------------------------------------------------------------------------ templates
def test_prompts_of_each_template():
    assert build_prompt("chat", "q2", [("q1", "a1")]) == "Question: q1 Answer: a1\nQuestion: q2 Answer:"
    assert build_prompt("vqa", "q") == "Question: q Short answer:"
    assert build_prompt("base", "q") == "q"


@pytest.mark.parametrize("template, prompt", [("base", "Describe."), ("vqa", "Question: Describe. Short answer:")])
def test_base_and_vqa_put_the_video_in_one_run(tokenizer, template, prompt):
    processor = CogVLM2Processor(tokenizer, template_version=template)
    inputs = processor.build_inputs("Describe.", num_frames=3)
    text_ids = tokenizer.encode(prompt)
    assert inputs["input_ids"][0].tolist() == [128000] + [128002] * 66 * 3 + text_ids
    assert inputs["token_type_ids"][0].tolist() == [0] + [1] * 66 * 3 + [0] * len(text_ids)
    expected_positions = [0, 1] + [2] * (66 * 3 - 2) + [3] + list(range(4, 4 + len(text_ids)))
    assert inputs["position_ids"][0].tolist() == expected_positions
    assert processor.frame_strategy == "base"


def test_base_template_warns_that_history_is_ignored(tokenizer):
    processor = CogVLM2Processor(tokenizer, template_version="base")
    with pytest.warns(UserWarning, match="ignores the history"):
        with_history = processor.build_inputs("q", history=[("a", "b")])
    np.testing.assert_array_equal(with_history["input_ids"], processor.build_inputs("q")["input_ids"])


def test_position_ids_of_short_vision_runs():
    # runs of length 1 and 2 are all boi/eoi, i.e. language
    assert build_position_ids([0, 1, 0, 1, 1, 0]).tolist() == [0, 1, 2, 3, 4, 5]
    assert build_position_ids([1, 1, 1, 1]).tolist() == [0, 1, 1, 2]


# ------------------------------------------------------------------------------------ frames
def test_image_file_is_a_one_frame_video(processor, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), image[:, :, ::-1])  # OpenCV writes BGR
    inputs = processor(text="What is this?", video=path)
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert inputs["frame_indices"].tolist() == [0]
    assert inputs["input_ids"][0, 1:68].tolist() == [128002] * 66 + [15]  # 66 vision tokens, then "0"
    np.testing.assert_array_equal(inputs["pixel_values"], processor.transform(image[None]))


def test_decoded_frames_can_be_passed_directly(processor, main_inputs):
    frames, indices = processor.load_video(VIDEO)
    assert frames.dtype == np.uint8 and frames.shape == (META["T"], 720, 1280, 3)
    np.testing.assert_array_equal(indices, GOLDEN["frame_indices"])
    inputs = processor(text=PROMPT, video=frames)
    np.testing.assert_array_equal(inputs["input_ids"], main_inputs["input_ids"])
    np.testing.assert_array_equal(inputs["pixel_values"], main_inputs["pixel_values"])


@pytest.mark.parametrize("height, width", [(37, 53), (53, 37), (30, 30), (250, 240)])
def test_transform_matches_torch_bilinear_transcription(height, width):
    processor = CogVLM2Processor(CogVLM2Tokenizer(), image_size=24)
    frame = np.random.default_rng(height).integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    mean, std = np.float32(processor.image_mean), np.float32(processor.image_std)
    normalized = (frame[0].astype(np.float32) / np.float32(255) - mean) / std
    short, long = min(height, width), max(height, width)
    new_long = int(24 * long / short)
    new_h, new_w = (24, new_long) if height <= width else (new_long, 24)
    resized = torch_bilinear_reference(normalized, new_h, new_w)
    top, left = int(round((new_h - 24) / 2)), int(round((new_w - 24) / 2))
    expected = resized[top:top + 24, left:left + 24].transpose(2, 0, 1)
    assert np.abs(processor.transform(frame)[0] - expected).max() <= 1e-6


def test_chat_and_base_selection_rules():
    start_times = np.arange(15, dtype=np.float32) / 25  # 0.6 s at 25 fps
    assert chat_frame_indices(start_times, 24).tolist() == [0, 14]
    assert chat_frame_indices(start_times[:12], 24).tolist() == [0]  # last frame at 0.44 s
    # s=1 is 0.5 s from frames 1 and 2: the first wins; round(1.5) = 2 gives a third second
    assert chat_frame_indices(np.array([0.0, 0.5, 1.5], np.float32), 24).tolist() == [0, 1, 2]
    assert base_frame_indices(1500, 25.0, 24).tolist() == np.linspace(0, 1499, 24, dtype=int).tolist()
    assert base_frame_indices(15000, 25.0, 24).tolist() == np.linspace(0, 1499, 24, dtype=int).tolist()


def test_clip_under_half_a_second_gives_one_frame(processor, tmp_path):
    path = write_video(tmp_path / "short.mp4", seconds=0.4)
    frames, indices = processor.load_video(path)
    assert frames.shape == (1, 48, 64, 3) and indices.tolist() == [0]


def test_long_video_reads_only_the_selected_frames(processor, tmp_path):
    level = lambda frame, fps: 10 * (frame // fps) % 250  # grey level encodes the second
    path = write_video(tmp_path / "long.mp4", seconds=600, level=level)
    frames, indices = processor.load_video(path)
    assert indices.tolist() == [25 * s for s in range(24)]
    assert np.abs(frames.mean(axis=(1, 2, 3)) - [10 * s for s in range(24)]).max() < 5  # neighbours: 10 apart

    base = CogVLM2Processor(processor.tokenizer, template_version="base")
    frames, indices = base.load_video(path)
    assert indices.tolist() == np.linspace(0, 60 * 25 - 1, 24, dtype=int).tolist()
    assert np.abs(frames.mean(axis=(1, 2, 3)) - [level(i, 25) for i in indices]).max() < 5


# ------------------------------------------------------------------------------------ bad inputs
def _mp4_bytes():
    with open(VIDEO, "rb") as handle:
        return handle.read()


def _bad_files(tmp_path):
    data = _mp4_bytes()
    moved = faststart(data)
    _, media_at, media_size = next(a for a in mp4_atoms(data) if a[0] == b"mdat")
    keep = media_at + 64  # box header and a few bytes; the rest of the frame data becomes zeros
    zeroed = data[:keep] + bytes(media_at + media_size - keep) + data[media_at + media_size:]
    files = {
        "text.mp4": b"these are my notes, not a video\n" * 20,
        "empty.mp4": b"",
        "truncated.mp4": data[:len(data) // 2],  # the index (moov, at the end) is lost
        "truncated_faststart.mp4": moved[:len(moved) // 2],  # index intact, frames missing
        "zeroed.mp4": zeroed,  # container intact, no frame decodes
        "broken.png": cv2.imencode(".png", np.zeros((20, 20, 3), np.uint8))[1].tobytes()[:60],
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    write_video(tmp_path / "no_frames.mp4", seconds=0)
    return tmp_path


@pytest.mark.parametrize("name, message", [
    ("missing.mp4", "not found"),
    ("a_directory", "is a directory"),
    ("text.mp4", "is a text file"),
    ("empty.mp4", "is empty"),
    ("truncated.mp4", "truncated"),
    ("truncated_faststart.mp4", "ends early"),
    ("zeroed.mp4", "cannot be decoded"),
    ("no_frames.mp4", "no video stream"),
    ("broken.png", "not a valid .png image"),
])
def test_bad_video_files_raise_clear_errors(processor, tmp_path, capfd, name, message):
    (_bad_files(tmp_path) / "a_directory").mkdir()
    path = str(tmp_path / name)
    with pytest.raises(CogVLM2InputError, match=message) as error:
        processor(text=PROMPT, video=path)
    assert path in str(error.value)
    assert error.value.__context__ is None or error.value.__suppress_context__  # no decord traceback
    assert "video_reader.cc" not in capfd.readouterr().err  # decord's C++ log does not leak


def test_unknown_template_is_rejected(tokenizer):
    with pytest.raises(CogVLM2InputError, match=r"'chatt'.*'base', 'chat', 'vqa'"):
        CogVLM2Processor(tokenizer, template_version="chatt")


def test_too_long_prompt_names_token_count_and_limit(tokenizer):
    processor = CogVLM2Processor(tokenizer, max_length=420)
    processor.build_inputs(PROMPT, num_frames=6)  # 412 tokens fit
    with pytest.raises(CogVLM2InputError, match=r"needs 424 tokens .* max_length=420"):
        processor.build_inputs(HIST_QUERY, num_frames=6, history=HISTORY)


@pytest.mark.parametrize("call, message", [
    (lambda p: p(text=PROMPT, history=[("only a question",)]), r"history\[0\]"),
    (lambda p: p([{"audio": "x.wav"}, {"text": "hi"}]), "unknown query key 'audio'"),
    (lambda p: p([{"video": VIDEO}]), "no {'text': ...}"),
    (lambda p: p(text=None), "no question"),
])
def test_bad_arguments_are_explained(processor, call, message):
    with pytest.raises(CogVLM2InputError, match=message):
        call(processor)


# ------------------------------------------------------------------------------------ integration
def test_registered_with_mindformers():
    from mindformers.models.build_processor import build_processor
    processor = build_processor({"type": "CogVLM2Processor", "num_frames": 8,
                                 "tokenizer": {"type": "CogVLM2Tokenizer"}})
    assert isinstance(processor, CogVLM2Processor) and processor.num_frames == 8
    assert processor.post_process([[9906, 11, 1917, 0, 128009]]) == ["Hello, world!"]


# ------------------------------------------------------------------------------------ properties
_turn = st.tuples(st.text(max_size=40), st.text(max_size=40))


@settings(max_examples=50, deadline=None)
@given(query=st.text(max_size=80), history=st.lists(_turn, max_size=3), num_frames=st.integers(0, 3))
def test_inputs_are_consistent_for_any_text(processor, query, history, num_frames):
    inputs = processor.build_inputs(query, num_frames=num_frames, history=history)
    ids, types, positions = (inputs[k][0] for k in ("input_ids", "token_type_ids", "position_ids"))
    assert len(ids) == len(types) == len(positions) == inputs["attention_mask"].shape[1]
    assert np.all(np.diff(positions) >= 0) and positions[0] == 0
    assert int(types.sum()) == 66 * num_frames
    n_video = 66 * num_frames + sum(len(processor.tokenizer.encode(str(i))) for i in range(num_frames))
    assert processor.tokenizer.decode(ids[1 + n_video:]) == build_prompt("chat", query, history)
