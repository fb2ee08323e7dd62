"""Frames read on several threads at once (the engine's preprocessing workers) leave stderr intact."""
import os
import threading

import cogvlm2  # noqa: F401  (mindspore before decord)
from cogvlm2.cogvlm2_video_io import load_frames

VIDEO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "bigbuckbunny.mp4")


def test_concurrent_reads_restore_stderr():
    before = os.fstat(2)
    threads = [threading.Thread(target=lambda: [load_frames(VIDEO) for _ in range(3)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
