"""What the command-line entry points share (run_predict.py, run_server.py, tools/*.py, the converter):
signals that end a run like Ctrl-C, files written whole or not at all, and one-line error messages."""
import contextlib
import os
import signal
import tempfile
import threading

from cogvlm2.cogvlm2_errors import CogVLM2Error

__all__ = ["interrupt_on_signals", "write_atomically", "one_line", "is_user_error"]


@contextlib.contextmanager
def interrupt_on_signals(signals=(signal.SIGINT, signal.SIGTERM), on_signal=None):
    """Inside the block the given signals raise KeyboardInterrupt (whatever handler a library
    installed), so ``finally`` clauses clean up. Only the main thread can install handlers.

    Yields an Event that is set on the signal. Python drops an exception raised while the main
    thread is inside a ``__del__``, so code that waits on other threads should also check the event;
    ``on_signal()`` (e.g. ``engine.cancel_all``) is called first, to end such waits."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def interrupt(signum, frame):
        stopped.set()
        if on_signal is not None:
            on_signal()
        raise KeyboardInterrupt(f"signal {signum}")

    saved = {sig: signal.signal(sig, interrupt) for sig in signals}
    try:
        yield stopped
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def write_atomically(path: str, text: str, mode: int = 0o640):
    """Write ``text`` via a temporary file in the same folder, then rename: readers never see half a
    file, two writers never interleave, and an interrupted write leaves nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def is_user_error(err: BaseException) -> bool:
    """The plugin's error family and file-system errors (a read-only folder, a full disk): their
    message names the file or value, so the user gets one line and exit code 2."""
    return isinstance(err, (CogVLM2Error, OSError))
