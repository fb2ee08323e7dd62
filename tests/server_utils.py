"""Helpers for the server tests: run a FastAPI app with uvicorn on 127.0.0.1 (a free port) in a thread,
or run_server.py in a subprocess; both are stopped when the block ends."""
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_healthy(base_url: str, timeout: float = 180, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base_url}/health not 200 after {timeout} s")


@contextlib.contextmanager
def serve_in_thread(app, timeout: float = 180):
    """Yield the base URL of ``app`` served by uvicorn in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_healthy(base, timeout)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_subprocess(*flags, timeout: float = 180):
    """Yield (base URL, Popen) of ``python run_server.py FLAGS --port <free>``; killed if still running."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO}
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "run_server.py"), *flags, "--host", "127.0.0.1",
                                "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, timeout, process)
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        if process.stdout:
            process.stdout.close()
