"""Fine-tuning against the official implementation + peft 0.13.2 (tests/fixtures/train_tiny_chat,
README.md there says how each number was made): inputs, loss, gradients, LoRA and full steps,
peft adapter files, merging."""
import json
import os

import numpy as np
import pytest
import mindspore as ms

from cogvlm2.cogvlm2 import CogVLM2ForVideo
from cogvlm2.cogvlm2_generation import generate
from cogvlm2.cogvlm2_lora import (PEFT_PREFIX, LoraConfig, apply_lora, load_adapter, lora_parameters, merge_lora,
                                  save_adapter)
from cogvlm2.cogvlm2_errors import CheckpointError, CogVLM2ConfigError
from cogvlm2.cogvlm2_processor import CogVLM2Processor
from cogvlm2.cogvlm2_train import AdamW, Trainable, freeze_for_full, freeze_for_lora
from cogvlm2.cogvlm2_train_data import build_training_sample, collate
from cogvlm2.cogvlm2_weights import checkpoint_layout

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "fixtures", "tiny_chat")
TRAIN = os.path.join(HERE, "fixtures", "train_tiny_chat")
VIDEO = os.path.join(HERE, "fixtures", "bigbuckbunny.mp4")
ADAPTER_INIT, ADAPTER = os.path.join(TRAIN, "adapter_init"), os.path.join(TRAIN, "adapter")
GOLDEN_LORA = LoraConfig(4, 8, 0.0, ["language_expert_query_key_value", "language_expert_dense"])
PAD = 128002


@pytest.fixture(scope="module")
def tg():
    return dict(np.load(os.path.join(TRAIN, "train_golden.npz")))


@pytest.fixture(scope="module")
def tmeta():
    with open(os.path.join(TRAIN, "train_meta.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def samples(tmeta):
    processor = CogVLM2Processor()
    return [build_training_sample(processor, s["query"], s["response"], s["history"],
                                  video=VIDEO if s["video"] else None) for s in tmeta["samples"]]


def _rel(ours, golden):
    return float(np.abs(ours - golden).max() / np.abs(golden).max())


def test_training_inputs_equal_golden(samples, tg, golden):
    for i, sample in enumerate(samples):
        for key in ("input_ids", "token_type_ids", "attention_mask", "labels", "position_ids"):
            np.testing.assert_array_equal(sample[key], tg[f"s{i}_{key}"], err_msg=f"s{i} {key}")
        assert sample["n_label"] == int(tg[f"base_loss/s{i}_n_label"])
    # the processor's pixel values are checked against the reference in test_processor (1e-5)
    assert np.abs(samples[0]["pixel_values"] - golden["pixel_values"]).max() <= 1e-5
    assert samples[1]["pixel_values"] is None


def test_padded_batch_keeps_each_samples_labels(samples):
    batch = collate(samples, PAD)
    assert batch["input_ids"].shape == (3, 429)
    assert batch["label_index"].shape[0] == 44 and batch["n_label"].tolist() == [17, 17, 10]
    assert (batch["input_ids"][1, 43:] == PAD).all() and (batch["bias"][1, 0, :, 43:] < -1e8).all()


def test_full_gradients_norms_and_three_steps(samples, tg):
    """Base loss (per sample and batch), every gradient norm, the listed gradients and embedding rows,
    then 3 AdamW steps on everything; the batch goes in as one padded batch and as two micro-batches;
    with activation recompute the loss and gradients are the same."""
    net = CogVLM2ForVideo.from_pretrained(TINY)
    params = freeze_for_full(net, freeze_vision=False)
    trainable = Trainable(net, params)
    loss, sample_ce, grads = trainable.loss_and_grads([collate(samples, PAD)], 44)
    assert abs(loss - tg["base_loss/batch"]) <= 1e-5
    for i, n in enumerate((17, 17, 10)):
        assert abs(sample_ce[i] / n - tg[f"base_loss/s{i}_mean"]) <= 1e-5
    named = dict(zip(trainable.names, grads))
    layout = checkpoint_layout(net)
    norms = [k for k in tg if k.startswith("full_grad_norm/")]
    assert len(norms) == len(named)
    for key in norms:
        name = key.split("/", 1)[1]
        norm = np.linalg.norm(named[name].astype(np.float64))
        assert abs(norm - tg[key]) <= 1e-4 * tg[key], name
    for key in (k for k in tg if k.startswith("full_grad/")):
        name = key.split("/", 1)[1]
        ours = named[name].T if layout[name][1] else named[name]
        assert _rel(ours, tg[key]) <= 1e-4, name
    rows = tg["full_grad_row_ids/model.embed_tokens.weight"]
    embed = named["model.embed_tokens.weight"]
    assert _rel(embed[rows], tg["full_grad_rows/model.embed_tokens.weight"]) <= 1e-4
    assert not np.delete(embed, rows, 0).any() and not embed[PAD].any()   # vision rows: zero
    # micro-batches of different lengths: same loss and gradients
    loss2, _, grads2 = trainable.loss_and_grads([collate(samples[:1], PAD), collate(samples[1:], PAD)], 44)
    assert abs(loss2 - loss) <= 1e-6
    assert max(_rel(a, b) for a, b in zip(grads2, grads) if np.abs(b).max() > 0) <= 1e-5
    _check_recompute_keeps_loss_and_gradients(samples, tg, loss, grads)
    # 64 KiB writer groups: the parameters are written back by several assign graphs, as a large model's are
    optimizer = AdamW(params, (0.9, 0.999), 1e-8, 0.01, group_bytes=1 << 16)
    assert len(optimizer._writers) > 3
    losses = [loss]
    optimizer.apply([ms.Tensor(g) for g in grads], 1e-3)
    for _ in range(2):
        loss, _, grads = trainable.loss_and_grads([collate(samples, PAD)], 44)
        losses.append(loss)
        optimizer.apply([ms.Tensor(g) for g in grads], 1e-3)
    after, _, _ = trainable.loss_and_grads([collate(samples, PAD)], 44)
    assert np.abs(np.asarray(losses) - tg["full_losses"]).max() <= 1e-4
    assert abs(after - tg["full_loss_after_last_step"]) <= 1e-4


def test_fresh_lora_starts_as_peft():
    """Without --init_adapter: A ~ kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(in)), B = 0 (peft's default;
    B = 0 makes the adapted model the base model until trained)."""
    net = CogVLM2ForVideo.from_pretrained(TINY)
    ms.set_seed(0)
    apply_lora(net, GOLDEN_LORA)
    params = lora_parameters(net)
    for name, p in params.items():
        value = p.asnumpy()
        if name.endswith("lora_B"):
            assert not value.any(), name
        else:
            bound = 1 / np.sqrt(value.shape[0])           # A stored (in, r)
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.9 * bound, name
            assert abs(value.std() - bound / np.sqrt(3)) <= 0.25 * bound / np.sqrt(3), name


def _check_recompute_keeps_loss_and_gradients(samples, tg, loss, grads):
    """Activation recompute on every decoder and vision layer (the vision tower trains, so it runs in
    the graph): the loss and the listed gradients equal the golden ones as without recompute, and every
    gradient equals the network's without recompute to float32 rounding (measured: identical)."""
    net = CogVLM2ForVideo.from_pretrained(TINY)
    trainable = Trainable(net, freeze_for_full(net, freeze_vision=False), recompute=True)
    marked = [path for path, cell in net.cells_and_names() if getattr(cell, "_cogvlm2_recompute", False)]
    assert len(marked) == 4      # 2 decoder + 2 vision layers
    loss_rc, _, grads_rc = trainable.loss_and_grads([collate(samples, PAD)], 44)
    assert abs(loss_rc - tg["base_loss/batch"]) <= 1e-5 and abs(loss_rc - loss) <= 1e-6
    layout = checkpoint_layout(net)
    named = dict(zip(trainable.names, grads_rc))
    for key in (k for k in tg if k.startswith("full_grad/")):
        name = key.split("/", 1)[1]
        ours = named[name].T if layout[name][1] else named[name]
        assert _rel(ours, tg[key]) <= 1e-4, name
    assert max(_rel(a, b) for a, b in zip(grads_rc, grads) if np.abs(b).max() > 0) <= 1e-6


def test_lora_gradients_five_steps_save_merge(samples, tg, tmp_path):
    net = CogVLM2ForVideo.from_pretrained(TINY)
    config = load_adapter(net, ADAPTER_INIT, expected=GOLDEN_LORA)
    params = freeze_for_lora(net)
    assert len(params) == 8 and sum(p.size for p in params) == 1280
    trainable = Trainable(net, params)
    optimizer = AdamW(params, (0.9, 0.999), 1e-8, 0.01)
    batch = [collate(samples, PAD)]
    losses = []
    for step in range(5):
        loss, _, grads = trainable.loss_and_grads(batch, 44)
        if step == 0:
            for name, grad in zip(trainable.names, grads):
                assert _rel(grad.T, tg[f"lora_grad/{PEFT_PREFIX}{name}.weight"]) <= 1e-4, name
        losses.append(loss)
        optimizer.apply([ms.Tensor(g) for g in grads], 1e-3)
    after, _, _ = trainable.loss_and_grads(batch, 44)
    assert np.abs(np.asarray(losses) - tg["lora_losses"]).max() <= 2e-5
    assert abs(after - tg["lora_loss_after_last_step"]) <= 2e-5
    final = {name: p.asnumpy().T for name, p in lora_parameters(net).items()}
    diff = max(np.abs(v - tg[f"lora_final/{PEFT_PREFIX}{k}.weight"]).max() for k, v in final.items())
    assert diff <= 1e-5, diff    # measured 3.7e-7
    # saved in peft's names, layout and config keys; loads back bit-identically
    save_adapter(net, config, str(tmp_path / "adapter"))
    from safetensors.numpy import load_file
    ours, peft = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")), \
        load_file(os.path.join(ADAPTER, "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in peft.items()}
    with open(tmp_path / "adapter" / "adapter_config.json") as f, open(os.path.join(ADAPTER, "adapter_config.json")) as g:
        ours_cfg, peft_cfg = json.load(f), json.load(g)
    assert set(ours_cfg) == set(peft_cfg)
    assert {k: ours_cfg[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "peft_type", "bias")} == \
        {k: peft_cfg[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "peft_type", "bias")}
    again = CogVLM2ForVideo.from_pretrained(TINY)
    load_adapter(again, str(tmp_path / "adapter"))
    for name, p in lora_parameters(again).items():
        np.testing.assert_array_equal(p.asnumpy().T, ours[f"{PEFT_PREFIX}{name}.weight"])


def test_peft_adapters_load_with_golden_values(tg):
    for directory, prefix in ((ADAPTER_INIT, "lora_init/"), (ADAPTER, "lora_final/")):
        net = CogVLM2ForVideo.from_pretrained(TINY)
        load_adapter(net, directory, expected=GOLDEN_LORA)
        for name, p in lora_parameters(net).items():
            np.testing.assert_array_equal(p.asnumpy().T, tg[f"{prefix}{PEFT_PREFIX}{name}.weight"])


def test_merged_and_unmerged_greedy_tokens(tg, golden):
    inputs = {k: golden[k] for k in ("input_ids", "token_type_ids", "position_ids", "pixel_values")}
    unmerged = CogVLM2ForVideo.from_pretrained(TINY)
    load_adapter(unmerged, ADAPTER)
    tokens = generate(unmerged, **inputs, max_new_tokens=20).new_tokens[0].tolist()
    assert tokens == tg["gen_lora_unmerged_tokens"].tolist()
    merged = CogVLM2ForVideo.from_pretrained(TINY)
    load_adapter(merged, ADAPTER)
    merge_lora(merged)
    assert not lora_parameters(merged)
    assert generate(merged, **inputs, max_new_tokens=20).new_tokens[0].tolist() == tg["gen_lora_merged_tokens"].tolist()


def test_lora_config_errors(tmp_path):
    net = CogVLM2ForVideo.from_pretrained(TINY)
    with pytest.raises(CogVLM2ConfigError, match=r"\['no_such_layer'\] match no linear layer"):
        apply_lora(net, LoraConfig(4, 8, 0.0, ["no_such_layer"]))
    with pytest.raises(CheckpointError, match="rank 4 vs 8"):
        load_adapter(net, ADAPTER, expected=LoraConfig(8, 8, 0.0, GOLDEN_LORA.target_modules))
    with pytest.raises(CheckpointError, match="target_modules"):
        load_adapter(net, ADAPTER, expected=LoraConfig(4, 8, 0.0, ["language_expert_dense"]))
