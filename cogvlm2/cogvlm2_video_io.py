"""Reading the frames CogVLM2-Video looks at: decord for videos, OpenCV for a single image.

Frame selection follows the official ``load_video``:

- ``chat``: for every whole second s = 0, 1, ..., round(start time of the last frame), the frame whose
  start time is nearest to s (the first one on ties), at most ``num_frames`` frames. A clip shorter
  than 0.5 s gives one frame.
- ``base``: ``num_frames`` indices ``np.linspace(0, min(total, int(60 * fps)) - 1, num_frames, dtype=int)``
  (the first ``base_max_seconds`` seconds, evenly).

Only the selected frames are decoded (``VideoReader.get_batch``), so a long video costs about as much
as a short one. A single image file (``.jpg``, ``.png``, ... see ``IMAGE_EXTENSIONS``) is read as a
one-frame video with frame index 0.

Every failure is raised as ``CogVLM2InputError`` naming the file and the fix; decord's C++ messages
and ffmpeg's log lines are captured and summarised instead of reaching the user.
"""
import logging
import os
import re
import sys
import tempfile
import threading
from typing import Callable, Tuple

import cv2
import numpy as np

from cogvlm2.cogvlm2_errors import CogVLM2InputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
FRAME_STRATEGIES = ("chat", "base")
_HEADER_BYTES = 512
_REENCODE_HINT = ("Check that the file plays in a video player; re-download it, or re-encode it "
                  "(e.g. `ffmpeg -i input -c:v libx264 output.mp4`)")


def _decord():
    """Import decord on first use, i.e. after mindspore is loaded (the package imports it first).

    decord's libdecord.so is loaded with RTLD_GLOBAL and exports an old copy of
    ``std::random_device``; a mindspore loaded *after* it aborts with "random_device could not be
    read". Loading decord lazily keeps the safe order (and text-only use never loads decord).
    """
    import decord  # pylint: disable=import-outside-toplevel
    return decord


# ------------------------------------------------------------------------------------ frame selection
def chat_frame_indices(start_times, num_frames: int) -> np.ndarray:
    """Indices for the ``chat`` template from each frame's start time in seconds, shape (N,)."""
    times = np.asarray(start_times, dtype=np.float64)  # differences are exact, as in the reference
    if times.size == 0:
        return np.zeros(0, dtype=np.int64)
    last_second = int(np.round(times.max()))  # round half to even, as Python's round()
    seconds = np.arange(min(last_second + 1, num_frames), dtype=np.float64)
    distance = np.abs(times[None, :] - seconds[:, None])  # (S, N)
    return distance.argmin(axis=1).astype(np.int64)  # argmin keeps the first of equal distances


def base_frame_indices(total_frames: int, fps: float, num_frames: int, max_seconds: float = 60) -> np.ndarray:
    """Indices for the ``base`` template: evenly over the first ``max_seconds`` seconds.
    (A container without a frame rate counts as one frame long, where the reference would fail.)"""
    end_frame = max(1, min(total_frames, int(max_seconds * fps)))
    return np.linspace(0, end_frame - 1, num_frames, dtype=int).astype(np.int64)


# ------------------------------------------------------------------------------------ public readers
def load_frames(path, strategy: str = "chat", num_frames: int = 24,
                base_max_seconds: float = 60) -> Tuple[np.ndarray, np.ndarray]:
    """Frames of a video (or of one image) as uint8 RGB (T, H, W, 3) and their indices (T,) int64."""
    path = check_media_path(path)
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        return read_image(path)
    return read_video(path, strategy, num_frames, base_max_seconds)


def read_video(path: str, strategy: str = "chat", num_frames: int = 24,
               base_max_seconds: float = 60) -> Tuple[np.ndarray, np.ndarray]:
    """Decode only the frames selected by ``strategy``: uint8 RGB (T, H, W, 3) and indices (T,)."""
    if strategy not in FRAME_STRATEGIES:
        raise CogVLM2InputError(f"unknown frame strategy {strategy!r}: choose one of {FRAME_STRATEGIES}")
    decord = _decord()
    reader = _call_decord(path, lambda: decord.VideoReader(path, ctx=decord.cpu(0)))
    total = len(reader)
    if total == 0:
        raise CogVLM2InputError(f"video {path!r} has no decodable frames. {_REENCODE_HINT}")
    if strategy == "chat":
        start_times = _call_decord(path, lambda: reader.get_frame_timestamp(np.arange(total))[:, 0])
        indices = chat_frame_indices(start_times, num_frames)
    else:
        indices = base_frame_indices(total, reader.get_avg_fps(), num_frames, base_max_seconds)
    frames = _call_decord(path, lambda: reader.get_batch(indices.tolist()).asnumpy())
    return frames, indices


def read_image(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """A single image as a one-frame video: uint8 RGB (1, H, W, 3) and indices [0]."""
    with _NativeStderr() as log:  # OpenCV logs its own warnings for broken files
        image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        detail = log.text.strip().splitlines()[-1] if log.text.strip() else "OpenCV cannot decode it"
        raise CogVLM2InputError(f"cannot decode image {path!r}: the file is not a valid {os.path.splitext(path)[1]} "
                                f"image ({detail}). Open it in an image viewer or re-save it")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)[None], np.zeros(1, dtype=np.int64)


def check_media_path(path) -> str:
    """The path as a str, if it names a non-empty file that is not plain text."""
    if not isinstance(path, (str, os.PathLike)):
        raise CogVLM2InputError(f"video must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CogVLM2InputError(f"video file not found: {path!r} (looked in {os.path.abspath(path)!r}). "
                                "Check the path; a relative path is resolved against the current directory")
    if os.path.isdir(path):
        raise CogVLM2InputError(f"{path!r} is a directory, not a video file: pass the path of one video file")
    header = _read_header(path)
    if not header:
        raise CogVLM2InputError(f"video file {path!r} is empty (0 bytes). {_REENCODE_HINT}")
    if _looks_like_text(header):
        raise CogVLM2InputError(f"{path!r} is a text file, not a video (its first bytes are "
                                f"{header[:40]!r}). Pass the path of the video itself")
    return path


# ------------------------------------------------------------------------------------ helpers
def _read_header(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(_HEADER_BYTES)
    except OSError as error:
        raise CogVLM2InputError(f"cannot open {path!r}: {error.strerror}. Check the file's permissions") from None


def _looks_like_text(header: bytes) -> bool:
    """True when the first bytes are printable UTF-8 text (videos start with binary headers)."""
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        # the header may end inside a multi-byte character
        try:
            text = header[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(ch.isprintable() or ch in "\t\r\n\f" for ch in text)


def _call_decord(path: str, action: Callable):
    """Run a decord call; turn its failure (and ffmpeg's log) into a CogVLM2InputError."""
    with _NativeStderr() as log:
        try:
            result, failure = action(), None
        except Exception as error:  # decord raises DECORDError / RuntimeError carrying C++ traces
            result, failure = None, error
    if failure is not None:
        raise CogVLM2InputError(_describe_decord_failure(path, str(failure), log.text)) from None
    if log.text.strip():
        logger.debug("decord/ffmpeg log for %s:\n%s", path, log.text)
    return result


_DECORD_REASONS = (  # (text in decord's error or ffmpeg's log, what it means for the user)
    ("cannot find video stream", "it contains no video stream (audio only, empty, or not a video)"),
    ("partial file", "the file ends early (truncated download or interrupted recording)"),
    ("av_read_frame failed", "the file ends early or is damaged, so a selected frame cannot be read"),
    ("moov atom not found", "its MP4 index (moov atom) is missing: the file is truncated or not an MP4 video"),
    ("Invalid NAL unit", "its video frames cannot be decoded (damaged data)"),
    ("Cannot create buffer source", "its video frames cannot be decoded (damaged data or unknown pixel format)"),
    ("Invalid data found when processing input", "ffmpeg does not recognise it as a video"),
)


def _describe_decord_failure(path: str, message: str, native_log: str) -> str:
    everything = f"{message}\n{native_log}"
    reason = next((why for key, why in _DECORD_REASONS if key in everything), None)
    if reason is None:
        first_line = message.strip().splitlines()[0] if message.strip() else type(message).__name__
        reason = "decord/ffmpeg failed: " + re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", first_line)
    return f"cannot read video {path!r}: {reason}. {_REENCODE_HINT}"


class _NativeStderr:
    """Route file descriptor 2 (where ffmpeg and decord's C++ code log) to a temporary file.

    After the ``with`` block ``text`` holds what was written. If fd 2 cannot be redirected the block
    runs unchanged and ``text`` stays empty. fd 2 is process-wide: what other threads write to stderr
    during the block is captured too (it is logged at debug level when the call succeeds). Blocks
    running at once in several threads (the engine's preprocessing workers) share one redirection:
    the first saves fd 2, the last restores it, so fd 2 never stays on a temporary file.
    """
    _lock = threading.Lock()
    _users = 0
    _saved_fd = None
    _file = None

    def __init__(self):
        self.text = ""
        self._start = None

    def __enter__(self):
        cls = _NativeStderr
        with cls._lock:
            if cls._users == 0:
                try:
                    if sys.stderr is not None:
                        sys.stderr.flush()
                    cls._file = tempfile.TemporaryFile()
                    cls._saved_fd = os.dup(2)
                    os.dup2(cls._file.fileno(), 2)
                except (OSError, ValueError):
                    if cls._saved_fd is not None:
                        os.close(cls._saved_fd)
                    if cls._file is not None:
                        cls._file.close()
                    cls._file = cls._saved_fd = None
                    return self
            cls._users += 1
            self._start = os.fstat(cls._file.fileno()).st_size
        return self

    def __exit__(self, *exc_info):
        cls = _NativeStderr
        if self._start is None:
            return False
        with cls._lock:
            end = os.fstat(cls._file.fileno()).st_size
            self.text = os.pread(cls._file.fileno(), end - self._start, self._start).decode("utf-8", errors="replace")
            cls._users -= 1
            if cls._users == 0:
                os.dup2(cls._saved_fd, 2)
                os.close(cls._saved_fd)
                cls._file.close()
                cls._file = cls._saved_fd = None
        return False
