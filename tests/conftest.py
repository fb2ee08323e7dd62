"""Shared fixtures: the official implementation's outputs for the tiny golden model."""
import json
import os

import numpy as np
import pytest

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny_chat")


@pytest.fixture(scope="session")
def golden():
    """golden.npz: every array the reference produced (inputs, embeddings, logits, tokens)."""
    return dict(np.load(os.path.join(TINY, "golden.npz")))


@pytest.fixture(scope="session")
def meta():
    """meta.json: the reference run's settings, token lists and decoded answers."""
    with open(os.path.join(TINY, "meta.json"), encoding="utf-8") as f:
        return json.load(f)
