"""Media for the server: turn a request's URL into a local file the engine can read, safely.

A URL is one of
- ``data:<mime>;base64,<payload>``: decoded into a temporary file (the extension follows the mime type,
  because the processor reads ``.jpg``/``.png``/... as one picture and everything else as a video);
  its size is checked from the payload length *before* decoding;
- ``file:///abs/path`` or a plain path: only under ``--media_root`` (relative paths are relative to
  it). The path is resolved with ``os.path.realpath`` (``..`` and every symlink followed) and refused
  unless it stays inside the root's real path: nothing outside is ever opened;
- ``http(s)://``: only with ``--allow_remote_media``, downloaded with a size limit and a time limit.

Every refusal is a ``MediaError`` carrying the HTTP status (400 bad URL, 403 not allowed, 413 too big)
and one line saying what to do. Also here: ``frame_thumbnails`` for the web page (the sampled frames
with their timestamps, read with the processor's own frame selection).
"""
import base64
import binascii
import os
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from cogvlm2.cogvlm2_video_io import IMAGE_EXTENSIONS

__all__ = ["MediaError", "MediaPolicy", "LocalMedia", "resolve_media", "frame_thumbnails", "MIME_EXTENSIONS"]

# data URL mime type -> file extension (the processor picks the image or video reader by extension)
MIME_EXTENSIONS = {
    "video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
    "video/x-msvideo": ".avi", "video/mpeg": ".mpg", "video/x-m4v": ".m4v", "video/x-flv": ".flv",
    "image/jpeg": ".jpg", "image/png": ".png", "image/bmp": ".bmp", "image/webp": ".webp",
    "image/tiff": ".tif",
}


class MediaError(Exception):
    """A media URL the server refuses: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class MediaPolicy:
    """The server's media flags."""
    media_root: Optional[str] = None          # None: no file access at all
    max_bytes: int = 100 * 2 ** 20            # uploads, data URLs and downloads
    allow_remote: bool = False
    remote_timeout: float = 30.0              # seconds for a whole download
    temp_dir: Optional[str] = None            # where decoded data URLs and downloads go

    def __post_init__(self):
        if self.media_root is not None:
            self.media_root = os.path.realpath(self.media_root)


@dataclass
class LocalMedia:
    """A file the engine may open; ``temporary`` files are deleted by ``release``."""
    path: str
    kind: str                                 # "video" or "image"
    temporary: bool = False
    _released: bool = field(default=False, repr=False)

    def release(self):
        if self.temporary and not self._released:
            self._released = True
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _mb(size: int) -> str:
    return f"{size / 2 ** 20:.1f} MB"


async def resolve_media(url: str, kind: str, policy: MediaPolicy, param: str) -> LocalMedia:
    """The local file for a ``video_url``/``image_url`` URL; a MediaError for anything not allowed."""
    if not isinstance(url, str) or not url:
        raise MediaError(400, f"{param}: empty URL", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        return _from_data_url(url, kind, policy, param)
    if scheme in ("http", "https"):
        return await _download(url, kind, policy, param)
    if scheme == "file":
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(400, f"{param}: file URL with host {parsed.netloc!r}; use file:///path", param)
        return LocalMedia(_inside_root(urllib.parse.unquote(parsed.path), policy, param), kind)
    if scheme and len(scheme) > 1:   # (a one-letter "scheme" is a Windows drive)
        raise MediaError(400, f"{param}: unsupported URL scheme {scheme!r}; use a data:, file:// or "
                              "http(s):// URL or a path under --media_root", param)
    return LocalMedia(_inside_root(url, policy, param), kind)


def _inside_root(path: str, policy: MediaPolicy, param: str) -> str:
    """The real path of ``path`` if it lies under the media root (checked without opening it)."""
    if policy.media_root is None:
        raise MediaError(403, f"{param}: file access is off on this server; send the media as a data: URL, "
                              "or start the server with --media_root DIR", param)
    real = os.path.realpath(os.path.join(policy.media_root, path))   # an absolute path replaces the root
    if os.path.commonpath([real, policy.media_root]) != policy.media_root:
        raise MediaError(403, f"{param}: {path!r} is outside the media root; only files under --media_root "
                              "can be read", param)
    return real


def _suffix(mime: str, kind: str, param: str) -> str:
    suffix = MIME_EXTENSIONS.get(mime.lower())
    if suffix is None:
        raise MediaError(400, f"{param}: unsupported media type {mime!r}; use one of {', '.join(MIME_EXTENSIONS)}",
                         param)
    if kind == "image" and suffix not in IMAGE_EXTENSIONS:
        raise MediaError(400, f"{param}: an image_url holds {mime!r}; send videos as a video_url part", param)
    return suffix


def _temp_file(data: bytes, suffix: str, kind: str, policy: MediaPolicy) -> LocalMedia:
    fd, path = tempfile.mkstemp(prefix="cogvlm2-media-", suffix=suffix, dir=policy.temp_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return LocalMedia(path, kind, temporary=True)


def _from_data_url(url: str, kind: str, policy: MediaPolicy, param: str) -> LocalMedia:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError(400, f"{param}: a data URL must look like data:video/mp4;base64,<base64 data>", param)
    mime = header[len("data:"):-len(";base64")]
    suffix = _suffix(mime, kind, param)
    size = len(payload) * 3 // 4                           # decoded size, known before decoding
    if size > policy.max_bytes:
        raise MediaError(413, f"{param}: the data URL holds about {_mb(size)}, more than the server's limit of "
                              f"{_mb(policy.max_bytes)} (--max_media_mb)", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MediaError(400, f"{param}: the data URL's payload is not valid base64 ({err})", param) from None
    return _temp_file(data, suffix, kind, policy)


async def _download(url: str, kind: str, policy: MediaPolicy, param: str) -> LocalMedia:
    if not policy.allow_remote:
        raise MediaError(403, f"{param}: remote media is off on this server; send a data: URL, or start the "
                              "server with --allow_remote_media", param)
    import httpx
    path_suffix = os.path.splitext(urllib.parse.urlparse(url).path)[1].lower()
    try:
        async with httpx.AsyncClient(timeout=policy.remote_timeout, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise MediaError(400, f"{param}: GET {url} answered {response.status_code}", param)
                mime = response.headers.get("content-type", "").split(";")[0].strip()
                suffix = MIME_EXTENSIONS.get(mime.lower()) or path_suffix or ".mp4"
                if kind == "image" and suffix not in IMAGE_EXTENSIONS:
                    raise MediaError(400, f"{param}: {url} is not an image ({mime or path_suffix})", param)
                declared = int(response.headers.get("content-length") or 0)
                if declared > policy.max_bytes:
                    raise MediaError(413, f"{param}: {url} is {_mb(declared)}, more than the limit of "
                                          f"{_mb(policy.max_bytes)} (--max_media_mb)", param)
                chunks, total = [], 0
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > policy.max_bytes:
                        raise MediaError(413, f"{param}: {url} is larger than the limit of "
                                              f"{_mb(policy.max_bytes)} (--max_media_mb)", param)
                    chunks.append(chunk)
    except httpx.HTTPError as err:
        raise MediaError(400, f"{param}: cannot download {url}: {type(err).__name__} {err}", param) from None
    return _temp_file(b"".join(chunks), suffix, kind, policy)


def frame_thumbnails(processor, path: str, width: int = 160) -> List[dict]:
    """The frames the model looks at for ``path`` (the processor's own selection and reader), each as
    {"index", "time" (seconds, None for a picture), "thumbnail" (a JPEG data URL ``width`` wide)}."""
    import cv2
    frames, indices = processor.load_video(path)                       # (T, H, W, 3) uint8, (T,)
    times = [None] * len(indices)
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        import decord  # after mindspore (the package is imported), see cogvlm2_video_io
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        times = [round(float(t), 3) for t in reader.get_frame_timestamp(np.asarray(indices))[:, 0]]
    result = []
    for frame, index, time in zip(frames, indices, times):
        height = max(1, round(frame.shape[0] * width / frame.shape[1]))
        small = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError("OpenCV could not encode a thumbnail")
        result.append({"index": int(index), "time": time,
                       "thumbnail": "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode()})
    return result
