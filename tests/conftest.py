"""Shared fixtures: the official implementation's outputs for the tiny golden model."""
import json
import os

import numpy as np
import pytest

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny_chat")
RUN_PREDICT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_predict.py")


@pytest.fixture(scope="session")
def golden():
    """golden.npz: every array the reference produced (inputs, embeddings, logits, tokens)."""
    return dict(np.load(os.path.join(TINY, "golden.npz")))


@pytest.fixture(scope="session")
def meta():
    """meta.json: the reference run's settings, token lists and decoded answers."""
    with open(os.path.join(TINY, "meta.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cli():
    """run_predict.py as a module, for in-process runs of ``cli.main(argv)``."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_predict", RUN_PREDICT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory for run_predict.py (result file, mindformers' ./output logs), quiet
    MindSpore logs, and no msrun variables inherited from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCAL_DEFAULT_PATH", str(tmp_path / "output"))
    monkeypatch.setenv("GLOG_v", os.environ.get("GLOG_v", "3"))   # main() sets it if unset
    for key in ("MS_ROLE", "RANK_ID", "RANK_SIZE", "MS_WORKER_NUM"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path
