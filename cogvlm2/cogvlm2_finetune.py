"""The fine-tuning run: YAML settings, sample order, learning-rate schedule, the step loop, logs,
checkpoints, resume and data parallelism (msrun). ``run_finetune.py`` and the mindformers trainer
hook call ``finetune(...)``.

YAML keys (besides model/processor/context, as in the predict YAMLs):

    model.model_config.pet_config: {pet_type: lora, lora_rank, lora_alpha, lora_dropout, target_modules}
                                   (absent or null: full fine-tuning)
    finetune: {train_steps | epochs, global_batch_size, micro_batch_size, shuffle, save_steps,
               keep_checkpoint_max, freeze_vision}   # freeze_vision: full FT only (default true)
    optimizer: {type: AdamW, betas: [0.9, 0.999], eps: 1.e-8, weight_decay: 0.01}
    lr_schedule: {type: ConstantWarmUpLR | CosineWithWarmUpLR | LinearWithWarmUpLR,
                  learning_rate, warmup_steps, lr_end}
    recompute_config: {recompute: true}   # activation recompute: true (every decoder and vision layer),
                                          # N or [N] (the first N decoder layers + the vision layers), false
    seed: 0

Global batch k holds samples [k*G, (k+1)*G) of the concatenated epoch orders (each epoch a permutation
seeded by seed + epoch if shuffle), so any step's batch is known from k alone and a resumed run sees
exactly the batches of an uninterrupted one. Under msrun each rank computes a contiguous part of the
global batch; label-token counts and gradients are summed over ranks (AllReduce), rank 0 writes.
"""
import json
import math
import os
import shutil
import time
from typing import Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

from cogvlm2.cogvlm2_checkpoints import (latest_train_checkpoint, load_train_checkpoint, save_hf_checkpoint,
                                        save_train_checkpoint, set_parameters)
from cogvlm2.cogvlm2_cli import write_atomically
from cogvlm2.cogvlm2_errors import CogVLM2ConfigError, CogVLM2Error, CogVLM2InputError
from cogvlm2.cogvlm2_loading import build_from_yaml
from cogvlm2.cogvlm2_lora import LoraConfig, apply_lora, load_adapter, save_adapter
from cogvlm2.cogvlm2_train import AdamW, Trainable, freeze_for_full, freeze_for_lora
from cogvlm2.cogvlm2_train_data import JsonlDataset, collate, split_for_rank

__all__ = ["FinetuneSettings", "finetune", "NonFiniteLossError", "learning_rate", "batch_indices"]

_SCHEDULES = ("ConstantWarmUpLR", "CosineWithWarmUpLR", "LinearWithWarmUpLR")


class NonFiniteLossError(CogVLM2Error):
    """The loss became NaN or infinite: the run stops before applying that step."""


class FinetuneSettings:
    """The training part of a YAML, checked."""

    def __init__(self, yaml_config):
        model_config = yaml_config.model.model_config
        pet = model_config.get("pet_config")
        self.lora = LoraConfig.from_pet_config(pet) if pet else None
        section = yaml_config.get("finetune") or {}
        self.freeze_vision = bool(section.get("freeze_vision", True))
        runner = section   # mindformers' runner_config validates its own keys, so the loop's live here
        self.global_batch_size = _positive(runner, "global_batch_size", 1)
        self.micro_batch_size = _positive(runner, "micro_batch_size", self.global_batch_size)
        self.train_steps = runner.get("train_steps")
        self.epochs = runner.get("epochs")
        if self.train_steps is None and self.epochs is None:
            raise CogVLM2ConfigError("the finetune: section needs train_steps or epochs")
        self.shuffle = bool(runner.get("shuffle", True))
        self.save_steps = _positive(runner, "save_steps", 100)
        self.keep_checkpoint_max = _positive(runner, "keep_checkpoint_max", 2)
        self.seed = int(yaml_config.get("seed") or 0)
        opt = yaml_config.get("optimizer") or {}
        if str(opt.get("type", "AdamW")) != "AdamW":
            raise CogVLM2ConfigError(f"optimizer type {opt.get('type')!r} is not supported; use AdamW")
        self.betas = tuple(float(b) for b in opt.get("betas", (0.9, 0.999)))
        self.eps = float(opt.get("eps", 1e-8))
        self.weight_decay = float(opt.get("weight_decay", 0.01))
        lr = yaml_config.get("lr_schedule") or {}
        self.schedule = str(lr.get("type", "ConstantWarmUpLR"))
        if self.schedule not in _SCHEDULES:
            raise CogVLM2ConfigError(f"lr_schedule type {self.schedule!r}: use one of {_SCHEDULES}")
        self.learning_rate = float(lr.get("learning_rate", 1e-4))
        self.warmup_steps = int(lr.get("warmup_steps") or 0)
        self.lr_end = float(lr.get("lr_end") or 0.0)
        self.warmup_ratio = float(lr.get("warmup_ratio") or 0.0)
        self.recompute = _recompute(yaml_config.get("recompute_config"))

    def total_steps(self, dataset_size: int) -> int:
        if self.train_steps is not None:
            return int(self.train_steps)
        return int(self.epochs) * math.ceil(dataset_size / self.global_batch_size)


def _recompute(section):
    """recompute_config.recompute -> True / False / number of decoder layers (mindformers writes a
    per-pipeline-stage list; one stage here)."""
    if section is None:
        value = False
    elif isinstance(section, dict):
        value = section.get("recompute", False)
    else:   # mindformers' Trainer has turned the section into a TransformerRecomputeConfig
        value = getattr(section, "recompute", False)
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value >= 0:
        return value or False
    raise CogVLM2ConfigError(f"recompute_config recompute must be true, false or a layer count, got {value!r}")


def _positive(section, key, default) -> int:
    value = section.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CogVLM2ConfigError(f"finetune: {key} must be a positive integer, got {value!r}")
    return value


def learning_rate(settings: FinetuneSettings, step: int, total: int) -> float:
    """The learning rate of step ``step`` (1-based): linear warm-up, then constant / cosine / linear."""
    base = settings.learning_rate
    warmup = settings.warmup_steps or int(settings.warmup_ratio * total)
    if step <= warmup:
        return base * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if settings.schedule == "CosineWithWarmUpLR":
        return settings.lr_end + (base - settings.lr_end) * 0.5 * (1 + math.cos(math.pi * progress))
    if settings.schedule == "LinearWithWarmUpLR":
        return settings.lr_end + (base - settings.lr_end) * (1 - progress)
    return base


def batch_indices(settings: FinetuneSettings, dataset_size: int, step: int) -> List[int]:
    """Dataset indices of the global batch of ``step`` (1-based)."""
    start = (step - 1) * settings.global_batch_size
    out = []
    for position in range(start, start + settings.global_batch_size):
        epoch, offset = divmod(position, dataset_size)
        if settings.shuffle:
            order = np.random.default_rng(settings.seed + epoch).permutation(dataset_size)
            out.append(int(order[offset]))
        else:
            out.append(offset)
    return out


class _Parallel:
    """Rank, world size and sums over ranks (msrun sets MS_WORKER_NUM; one process: identity)."""

    def __init__(self):
        self.size = int(os.environ.get("MS_WORKER_NUM", "1") or 1)
        self.rank = 0
        if self.size > 1:
            from mindspore.communication import get_group_size, get_rank, init
            init()
            self.rank, self.size = get_rank(), get_group_size()
            self.all_reduce = ms.ops.AllReduce()

    def sum(self, array: np.ndarray) -> np.ndarray:
        if self.size == 1:
            return array
        return self.all_reduce(Tensor(array)).asnumpy()

    def sum_list(self, arrays: List[np.ndarray]) -> List[np.ndarray]:
        """One AllReduce of all arrays flattened together (float32)."""
        if self.size == 1:
            return arrays
        flat = self.sum(np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float32))
        out, offset = [], 0
        for a in arrays:
            out.append(flat[offset:offset + a.size].reshape(a.shape))
            offset += a.size
        return out


def _check_output(output_dir: str, resume: bool, overwrite: bool):
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not (resume or overwrite):
        raise CogVLM2InputError(f"output directory {output_dir} exists and is not empty; pass --resume to continue "
                                "its run or --overwrite to replace it")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CogVLM2InputError(f"--output_dir {output_dir} is a file; give a directory")


def _prepare_output(output_dir: str, resume: bool, overwrite: bool):
    if overwrite and not resume and os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)


def finetune(config_path: str, train_dataset: str, output_dir: str, load_checkpoint: Optional[str] = None,
             init_adapter: Optional[str] = None, resume: bool = False, overwrite: bool = False,
             skip_bad_samples: bool = False, progress: bool = True, output_dtype: Optional[str] = None,
             set_context: bool = True) -> Dict:
    """Run fine-tuning; returns a summary {steps, losses, output, skipped}. ``config_path``: a YAML path
    or a ``MindFormerConfig`` (mindformers' Trainer flow, which has built the context: set_context False)."""
    _check_output(output_dir, resume, overwrite)
    network, processor, yaml_config = build_from_yaml(config_path, load_checkpoint, set_context=set_context)
    parallel = _Parallel()   # after the YAML's context: init() fixes the device id
    if parallel.rank == 0:
        _prepare_output(output_dir, resume, overwrite)
    settings = FinetuneSettings(yaml_config)
    ms.set_seed(settings.seed)
    if settings.lora is not None:
        if init_adapter:
            load_adapter(network, init_adapter, expected=settings.lora)
        else:
            apply_lora(network, settings.lora)
        params = freeze_for_lora(network)
    else:
        if init_adapter:
            raise CogVLM2ConfigError("--init_adapter needs a pet_config (LoRA) in the YAML")
        params = freeze_for_full(network, settings.freeze_vision)
    trainable = Trainable(network, params, recompute=settings.recompute)
    optimizer = AdamW(params, settings.betas, settings.eps, settings.weight_decay)
    dataset = JsonlDataset(train_dataset, processor, skip_bad_samples)
    total = settings.total_steps(len(dataset))
    log_path = os.path.join(output_dir, "train_log.jsonl")
    ckpt_root = os.path.join(output_dir, "checkpoints")
    start = 0
    if resume:
        latest = latest_train_checkpoint(ckpt_root)
        if latest is None:
            raise CogVLM2InputError(f"--resume: no checkpoint in {ckpt_root}; run without --resume (and with "
                                    "--overwrite) to start over")
        arrays, opt_state, state = load_train_checkpoint(latest)
        set_parameters(network, arrays, latest)
        optimizer.load_state_arrays(opt_state, state["step"])
        start = state["step"]
        if parallel.rank == 0:
            _truncate_log(log_path, start)
    losses = []
    bar = None
    if progress and parallel.rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    try:
        for step in range(start + 1, total + 1):
            began = time.time()
            mine = split_for_rank(batch_indices(settings, len(dataset), step), parallel.rank, parallel.size)
            samples = [s for s in (dataset.sample(i) for i in mine) if s is not None]
            local_labels = sum(s["n_label"] for s in samples)
            counts = parallel.sum(np.asarray([local_labels, len(samples)], np.float32))
            total_labels, n_samples = int(counts[0]), int(counts[1])
            lr = learning_rate(settings, step, total)
            if total_labels == 0:
                raise CogVLM2InputError(f"step {step}: every sample of the global batch was skipped; "
                                        "fix the dataset")
            micro = [collate(samples[i:i + settings.micro_batch_size], processor.tokenizer.pad_token_id)
                     for i in range(0, len(samples), settings.micro_batch_size)]
            loss, _, grads = trainable.loss_and_grads(micro, total_labels, parallel.sum_list) if micro else \
                (0.0, [], parallel.sum_list([np.zeros(p.shape, np.float32) for p in params]))
            loss = float(parallel.sum(np.asarray([loss], np.float64).astype(np.float32))[0]) \
                if parallel.size > 1 else loss
            if not math.isfinite(loss):
                latest = latest_train_checkpoint(ckpt_root)
                raise NonFiniteLossError(
                    f"the loss is {loss} at step {step}; stopped before applying it. Last good checkpoint: "
                    f"{latest or 'none'}; lower the learning rate or check the data, then --resume")
            optimizer.apply(grads, lr)
            seconds = time.time() - began
            losses.append(loss)
            if parallel.rank == 0:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": step, "loss": loss, "learning_rate": lr, "label_tokens": total_labels,
                                        "samples": n_samples, "seconds": round(seconds, 4)}) + "\n")
                if step % settings.save_steps == 0 or step == total:
                    _save_checkpoint(ckpt_root, step, network, trainable, optimizer, settings)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{n_samples / seconds:.2f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    output = None
    if parallel.rank == 0:
        if settings.lora is not None:
            output = os.path.join(output_dir, "adapter")
            save_adapter(network, settings.lora, output)
        else:
            output = os.path.join(output_dir, "checkpoint")
            save_hf_checkpoint(network, output, output_dtype or _default_dtype(network))
    return {"steps": total, "losses": losses, "output": output, "skipped": dict(dataset.skipped),
            "rank": parallel.rank, "world_size": parallel.size}


def _default_dtype(network) -> str:
    return str(network.config.param_init_type)


def _save_checkpoint(root, step, network, trainable, optimizer, settings):
    arrays = {name: p.asnumpy() for name, p in zip(trainable.names, trainable.params)}
    save_train_checkpoint(os.path.join(root, f"step_{step}"), arrays, optimizer.state_arrays(), {"step": step})
    steps = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_") and n[5:].isdigit())
    for old in steps[:-settings.keep_checkpoint_max]:
        shutil.rmtree(os.path.join(root, f"step_{old}"), ignore_errors=True)


def _truncate_log(path: str, last_step: int):
    """Keep the log lines of steps <= last_step (a killed run may have logged steps after its checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    write_atomically(path, "".join(lines))
