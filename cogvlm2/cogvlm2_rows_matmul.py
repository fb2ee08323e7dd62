"""The decode step's CPU MatMul: a MindSpore "aot" Custom op that streams each weight once for all rows.

MindSpore 2.7.2's CPU MatMul (oneDNN 2.2 gemm) reads the weight once only for a single row; for 2-15
rows it packs or re-reads it, so a memory-bound decode step of 8 sequences cost 2-3.4x that of one
(README, "Batched decode and the CPU MatMul kernels"). ``kernels/rows_matmul.cc`` computes
``x (M, K) @ w (K, N)`` for up to 16 rows per pass over ``w``; it is only used by the decode step graph
(``CausalLMStep`` built with this op), never for prefill, where oneDNN's GEMM is the right kernel.

- ``resolve_decode_matmul(config_value, device_target)`` -> "rows" or "onednn" ("auto": rows on CPU
  when the kernel builds, onednn elsewhere);
- ``rows_matmul_op()`` -> the Custom primitive (built once per process; the .so is compiled with g++ at
  first use into a per-user cache, named by a hash of the source, flags, compiler and CPU, and renamed
  into place atomically, so concurrent first uses and other machines sharing a home cannot clash).

A build failure is one CogVLM2ConfigError line (which compiler, the first error line, what to set).
"""
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

from cogvlm2.cogvlm2_errors import CogVLM2ConfigError

__all__ = ["DECODE_MATMUL_CHOICES", "ROWS_PER_PASS", "resolve_decode_matmul", "rows_matmul_op", "build_library"]

DECODE_MATMUL_CHOICES = ("auto", "onednn", "rows")
ROWS_PER_PASS = 16          # rows the kernel keeps in registers per pass over the weight (kMaxRows)
FUNC_NAME = "RowsMatMul"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "rows_matmul.cc")
# -march=native: the library is built on the machine that runs it (the cache key includes the CPU flags).
# No OpenMP: the kernel starts one std::thread per extra core per call, so no idle worker threads spin
# beside MindSpore's own thread pool between calls.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")

_logger = logging.getLogger(__name__)
_op = None


def cache_dir() -> str:
    """Per-user folder for compiled kernels ($COGVLM2_CACHE, else $XDG_CACHE_HOME or ~/.cache, /cogvlm2)."""
    root = os.environ.get("COGVLM2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cogvlm2")
    return os.path.join(root, "kernels")


def _compiler() -> str:
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise CogVLM2ConfigError(f"decode_matmul 'rows' needs a C++ compiler to build {os.path.basename(SOURCE)}, "
                                 f"but {compiler!r} is not on PATH; install g++ (apt-get install -y g++) or set "
                                 "model_config decode_matmul: onednn")
    return compiler


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build_library() -> str:
    """Compile ``kernels/rows_matmul.cc`` unless the cache has it; -> the .so path."""
    compiler = _compiler()
    with open(SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:16]
    folder = cache_dir()
    path = os.path.join(folder, f"rows_matmul-{key}.so")
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=folder)
        os.close(fd)
    except OSError as error:
        raise CogVLM2ConfigError(f"cannot write the compiled decode kernel to {folder}: {error.strerror}; "
                                 "set COGVLM2_CACHE to a writable folder or decode_matmul: onednn") from None
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", tmp, SOURCE], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise CogVLM2ConfigError(f"{compiler} could not build {SOURCE}: {first.strip()[:300]}; "
                                     "set model_config decode_matmul: onednn to run without it")
        os.replace(tmp, path)          # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def rows_matmul_op():
    """The Custom primitive ``(x (M, K), w (K, N)) -> (M, N)`` float32, with dynamic shapes (the output
    shape comes from the library's ``RowsMatMulInferShape``)."""
    global _op  # pylint: disable=global-statement  (one primitive per process)
    if _op is None:
        import mindspore as ms
        from mindspore import ops
        from mindspore.ops import CustomRegOp, DataType
        library = build_library()
        # reg_info names the op: MindSpore's dynamic-shape runtime looks the op up by this name
        info = CustomRegOp(FUNC_NAME).input(0, "x").input(1, "w").output(0, "y") \
            .dtype_format(DataType.F32_Default, DataType.F32_Default, DataType.F32_Default) \
            .target("CPU").get_op_info()
        # out_shape=None: the C++ infer function, which the dynamic-shape runtime needs (a Python
        # out_shape fails there with "The prim is not a PrimitivePy")
        _op = ops.Custom(f"{library}:{FUNC_NAME}", out_shape=None, out_dtype=ms.float32, func_type="aot",
                         reg_info=info)
    return _op


def resolve_decode_matmul(choice: str, device_target: str, compute_dtype: str = "float32") -> str:
    """The config value -> "rows" or "onednn". "rows" is CPU + float32 only; "auto" picks it there and
    falls back to oneDNN (with a warning naming why) only if the kernel cannot be built."""
    if choice not in DECODE_MATMUL_CHOICES:
        raise CogVLM2ConfigError(f"decode_matmul {choice!r} must be one of {list(DECODE_MATMUL_CHOICES)}")
    if choice == "onednn":
        return "onednn"
    supported = device_target == "CPU" and compute_dtype == "float32"
    if choice == "rows":
        if not supported:
            raise CogVLM2ConfigError(f"decode_matmul 'rows' is a float32 CPU kernel; device {device_target} with "
                                     f"compute_dtype {compute_dtype} needs decode_matmul: onednn or auto")
        rows_matmul_op()
        return "rows"
    if not supported:
        return "onednn"
    try:
        rows_matmul_op()
    except CogVLM2ConfigError as error:
        _logger.warning("decode_matmul auto: using oneDNN for decode steps: %s", error)
        return "onednn"
    return "rows"
