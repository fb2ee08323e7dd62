"""Small videos of awkward lengths and frame rates, made the same way on every machine.

Each recipe is a list of frame start times, given exactly as integers over a time scale. ``make_video``
writes the frames with OpenCV's mp4v encoder (one flat grey level per frame), then rewrites the MP4
time-to-sample table (``stts``), the media time scale and the durations, so the frame timestamps that
decord reads are the recipe's own, whatever timestamps the local OpenCV/ffmpeg muxer chose. This is
also how the variable-frame-rate video is made: no package installable from PyPI that this project
already depends on can write one directly (OpenCV writes constant-rate files only).

Used by tests/test_processor.py and by tests/fixtures/make_reference_data.py, which ran the official
frame selection on the same files to produce tests/fixtures/reference_inputs.json.
"""
import struct

import numpy as np

SIZE = (32, 24)  # width, height


def constant_rate(frames: int, numerator: int, denominator: int = 1):
    """(timescale, durations) for ``frames`` frames at numerator/denominator fps."""
    return numerator, [denominator] * frames


def variable_rate(durations_ms):
    return 1000, list(durations_ms)


# name -> (timescale, per-frame durations in timescale units)
RECIPES = {
    "10fps_last_2.4s": constant_rate(25, 10),       # last frame starts at 2.4 s: round -> 2
    "10fps_last_2.5s": constant_rate(26, 10),       # 2.5 s: round half to even -> 2
    "10fps_last_2.6s": constant_rate(27, 10),       # 2.6 s -> 3
    "10fps_last_3.5s": constant_rate(36, 10),       # 3.5 s: round half to even -> 4
    "10fps_0.3s": constant_rate(4, 10),             # last frame at 0.3 s: one frame
    "one_frame": constant_rate(1, 30),
    "10fps_30s": constant_rate(301, 10),            # more seconds than the 24-frame limit
    "vfr": variable_rate([500, 1000, 250, 250] + [40] * 25 + [1500, 100, 900, 700]),  # ties, gaps
    "30fps_65s": constant_rate(65 * 30, 30),        # base: only the first 60 s count
    "29.97fps_61s": constant_rate(1829, 30000, 1001),  # base: int(60 * 29.97) = 1798 frames
}


def start_times(name: str) -> np.ndarray:
    """The recipe's frame start times in seconds (float64)."""
    timescale, durations = RECIPES[name]
    return np.concatenate([[0], np.cumsum(durations)[:-1]]) / timescale


def grey_level(index: int) -> int:
    return (37 * index) % 251


def make_video(name: str, path) -> str:
    """Write the recipe ``name`` to ``path`` (.mp4) and return the path as str."""
    import cv2  # pylint: disable=import-outside-toplevel
    timescale, durations = RECIPES[name]
    path = str(path)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 25, SIZE)
    for index in range(len(durations)):
        writer.write(np.full((SIZE[1], SIZE[0], 3), grey_level(index), dtype=np.uint8))
    writer.release()
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(set_frame_durations(data, timescale, durations))
    return path


# ------------------------------------------------------------------------------------ MP4 boxes
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


def _parse(data: bytes):
    """[(type, children list or payload bytes)] of the boxes in data."""
    boxes, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if size < 8:
            raise ValueError(f"unsupported MP4 box size {size} for {kind!r}")
        payload = data[offset + 8:offset + size]
        boxes.append((kind, _parse(payload) if kind in _CONTAINERS else payload))
        offset += size
    return boxes


def _serialize(boxes) -> bytes:
    out = b""
    for kind, content in boxes:
        payload = _serialize(content) if isinstance(content, list) else content
        out += struct.pack(">I4s", 8 + len(payload), kind) + payload
    return out


def _find(boxes, kind):
    return [content for k, content in boxes if k == kind]


def _replace(boxes, kind, payload):
    for i, (k, _) in enumerate(boxes):
        if k == kind:
            boxes[i] = (k, payload)


def _set_u32(payload: bytes, at: int, value: int) -> bytes:
    return payload[:at] + struct.pack(">I", value) + payload[at + 4:]


def set_frame_durations(data: bytes, timescale: int, durations) -> bytes:
    """The MP4 ``data`` (one video track, index after the media data, version-0 headers) with its
    frame durations replaced: media time scale ``timescale``, frame k lasting durations[k] units."""
    top = _parse(data)
    kinds = [k for k, _ in top]
    if kinds.index(b"moov") < kinds.index(b"mdat"):
        raise ValueError("expected the moov box after mdat (chunk offsets would move)")
    moov = _find(top, b"moov")[0]
    (trak,) = _find(moov, b"trak")
    mdia = _find(trak, b"mdia")[0]
    stbl = _find(_find(mdia, b"minf")[0], b"stbl")[0]
    stts = _find(stbl, b"stts")[0]
    entries = struct.unpack(">I", stts[4:8])[0]
    frames = sum(struct.unpack(">I", stts[8 + 8 * i:12 + 8 * i])[0] for i in range(entries))
    if frames != len(durations):
        raise ValueError(f"the file has {frames} frames, the recipe {len(durations)}")
    if _find(stbl, b"ctts"):
        raise ValueError("composition offsets (B-frames) are not supported")
    for edts in _find(trak, b"edts"):  # an edit list that starts the media at 0 is dropped
        (elst,) = _find(edts, b"elst")
        if elst[:8] != bytes(7) + b"\x01" or elst[12:16] != bytes(4):
            raise ValueError("only a one-entry edit list starting at media time 0 is supported")
    trak[:] = [(k, c) for k, c in trak if k != b"edts"]
    runs = []  # run-length encoded (count, delta)
    for delta in durations:
        if runs and runs[-1][1] == delta:
            runs[-1][0] += 1
        else:
            runs.append([1, delta])
    _replace(stbl, b"stts", stts[:4] + struct.pack(">I", len(runs))
             + b"".join(struct.pack(">II", c, d) for c, d in runs))
    total = int(sum(durations))
    mdhd = _find(mdia, b"mdhd")[0]
    if mdhd[0] != 0:
        raise ValueError("expected a version-0 mdhd")
    _replace(mdia, b"mdhd", _set_u32(_set_u32(mdhd, 12, timescale), 16, total))
    mvhd = _find(moov, b"mvhd")[0]
    movie_scale = struct.unpack(">I", mvhd[12:16])[0]
    movie_duration = round(total * movie_scale / timescale)
    _replace(moov, b"mvhd", _set_u32(mvhd, 16, movie_duration))
    _replace(trak, b"tkhd", _set_u32(_find(trak, b"tkhd")[0], 20, movie_duration))
    return _serialize(top)
