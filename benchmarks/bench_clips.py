"""Test clips for the benchmarks: the fixture video's frames, re-encoded at other lengths and sizes."""
import cv2


def read_frames(video: str):
    """Every frame of ``video`` (BGR arrays) and its frame rate (25 if the file does not say)."""
    capture = cv2.VideoCapture(video)
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames, fps


def write_clip(path: str, frames, fps: float, size) -> str:
    """``frames`` resized to ``size`` (width, height), written to ``path`` as mp4v."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for frame in frames:
        writer.write(cv2.resize(frame, size))
    writer.release()
    return path
