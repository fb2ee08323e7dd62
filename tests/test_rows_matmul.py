"""The decode step's rows kernel (cogvlm2_rows_matmul) against numpy float64, in the dynamic-shape graph
mode it runs in, plus its build errors and config choice."""
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from cogvlm2 import cogvlm2_rows_matmul as rows_module
from cogvlm2.cogvlm2_errors import CogVLM2ConfigError
from cogvlm2.cogvlm2_rows_matmul import resolve_decode_matmul, rows_matmul_op

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")


class Product(nn.Cell):
    """``rows(f(x), W)`` in one graph with a dynamic row count; f makes the operand non-contiguous in
    the source (a transpose or a column slice) so the graph hands the kernel a materialised view."""

    def __init__(self, weight, view):
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="weight")
        self.view = view
        self.rows = rows_matmul_op()

    def construct(self, x):
        if self.view == "transpose":
            x = x.T                                  # (K, M) -> (M, K)
        elif self.view == "slice":
            x = x[:, 1:-1]                           # (M, K + 2) -> (M, K)
        return self.rows(x, self.weight)


def tolerance(x, w):
    """|float32 result - exact| <= K * eps32 * sum_k |x_mk w_kn| (+ the rounding of the output): the
    standard bound for a length-K float32 dot product, whatever order the terms are added in. The rows
    kernel adds in k order, so its error stays well inside this; a wrong element or row is far outside."""
    k = x.shape[1]
    return k * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)) + 1e-30


@pytest.mark.parametrize("k, n", [(64, 48), (37, 203), (1024, 1536), (300, 16 * 3 + 5)])
@pytest.mark.parametrize("view", ["contiguous", "transpose", "slice"])
def test_rows_kernel_matches_float64(k, n, view):
    rng = np.random.default_rng(k * n)
    w = rng.standard_normal((k, n), dtype=np.float32)
    cell = Product(w, view)
    shape = {"contiguous": [None, k], "transpose": [k, None], "slice": [None, k + 2]}[view]
    cell.set_inputs(Tensor(shape=shape, dtype=ms.float32))
    for m in (1, 2, 3, 5, 8, 13, 16, 17, 33):      # register blocks 1..16 and the passes beyond 16 rows
        x = rng.standard_normal((m, k), dtype=np.float32)
        given = {"contiguous": x, "transpose": np.ascontiguousarray(x.T),
                 "slice": np.pad(x, ((0, 0), (1, 1)), constant_values=np.nan)}[view]
        got = cell(Tensor(given)).asnumpy()
        exact = x.astype(np.float64) @ w.astype(np.float64)
        assert got.shape == (m, n)
        assert np.all(np.abs(got - exact) <= tolerance(x, w)), (m, np.abs(got - exact).max())


def test_unknown_choice_and_device_are_one_clear_error():
    with pytest.raises(CogVLM2ConfigError, match="decode_matmul 'fast' must be one of"):
        resolve_decode_matmul("fast", "CPU")
    with pytest.raises(CogVLM2ConfigError, match="float32 CPU kernel"):
        resolve_decode_matmul("rows", "Ascend", "bfloat16")
    assert resolve_decode_matmul("auto", "Ascend", "bfloat16") == "onednn"
    assert resolve_decode_matmul("onednn", "CPU") == "onednn"
    assert resolve_decode_matmul("auto", "CPU") == "rows"


def test_build_failure_is_one_config_error_line(tmp_path, monkeypatch):
    broken = tmp_path / "rows_matmul.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(rows_module, "SOURCE", str(broken))
    monkeypatch.setenv("COGVLM2_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CogVLM2ConfigError) as info:
        rows_module.build_library()
    message = str(info.value)
    assert "\n" not in message and "rows_matmul.cc" in message and "decode_matmul: onednn" in message
    assert not any(name.endswith(".so") or ".tmp" in name for name in os.listdir(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(CogVLM2ConfigError, match="'no-such-compiler-xyz' is not on PATH"):
        rows_module.build_library()


def test_build_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("COGVLM2_CACHE", str(tmp_path))
    first = rows_module.build_library()
    assert os.path.isfile(first) and os.path.dirname(first) == str(tmp_path / "kernels")
    mtime = os.path.getmtime(first)
    assert rows_module.build_library() == first and os.path.getmtime(first) == mtime


TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny_chat")


def test_decode_calls_of_several_rows_use_the_rows_graph_and_match_the_onednn_step():
    from cogvlm2 import CogVLM2ForVideo
    from cogvlm2.cogvlm2_token_types import causal_bias
    assert CogVLM2ForVideo.from_pretrained(TINY, decode_matmul="onednn").decode_step is None
    model = CogVLM2ForVideo.from_pretrained(TINY)            # auto: rows on CPU
    assert model.decode_step is not None
    rng = np.random.default_rng(0)
    batch, length = 3, 6
    ids = rng.integers(0, 1000, (batch, length))
    positions = np.tile(np.arange(length), (batch, 1))
    _, past = model.run_step(ids, None, np.zeros_like(ids), positions, causal_bias(np.ones_like(ids), 0),
                             model.empty_cache(batch), np.arange(batch) * length + length - 1)
    calls = []
    decode_step = model.decode_step
    object.__setattr__(model, "decode_step", lambda *a: calls.append(a[0].shape) or decode_step(*a))
    step = (rng.integers(0, 1000, (batch, 1)), None, np.zeros((batch, 1), np.int64), np.full((batch, 1), length),
            causal_bias(np.ones((batch, length + 1), np.int64), length), past, np.arange(batch))
    rows_logits = model.run_step(*step)[0].asnumpy()
    assert calls == [(batch, 1)]
    model.run_step(*[a[:1] if isinstance(a, np.ndarray) else a for a in step[:5]],
                   tuple(p[:1] for p in past), np.arange(1))
    assert calls == [(batch, 1)]                             # one row stays on the oneDNN step graph
    object.__setattr__(model, "decode_step", None)
    onednn_logits = model.run_step(*step)[0].asnumpy()
    np.testing.assert_allclose(rows_logits, onednn_logits, rtol=0, atol=1e-6)
