"""The training graph beside the inference step: loss, gradients, AdamW.

- ``CausalLMLoss``: a batch from ``cogvlm2_train_data.collate`` -> sum of the token cross-entropies of
  every label token times ``loss_scale`` (1 / label tokens of the whole global batch), and the (M,)
  per-token cross-entropies. Logits are computed only at the M positions that predict a label (the
  official forward computes all of them, then ignores the -100 ones: same numbers, far less work).
  With ``vision_in_graph`` the vision tower runs inside the graph (its gradients are needed: full
  fine-tuning, or LoRA inside the tower); otherwise the frozen tower's embeddings come in as input.
- ``GradStep``: ``mindspore.value_and_grad`` of that loss w.r.t. the trainable parameters, compiled
  once (GRAPH) for every batch size, length and label count.
- ``AdamW``: torch.optim.AdamW's single-tensor update, step by step the same operations.
- ``Trainable``: the network, its trainable parameters and the two graphs, plus ``loss_and_grads`` which
  accumulates a global batch over micro-batches (and ranks) token-weighted, exactly as the official
  per-sample backward of loss_i * n_i / N.
- ``enable_recompute``: activation recompute (the YAML's ``recompute_config.recompute``): every decoder
  layer and every vision-tower layer keeps only its output for the backward pass and recomputes its
  inside (attention scores/probabilities, MLP activations) there; same numbers, less memory.
"""
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, mutable, nn, ops

from cogvlm2.cogvlm2 import CogVLM2ForVideo
from cogvlm2.cogvlm2_errors import CogVLM2ConfigError
from cogvlm2.cogvlm2_layers import BF16_BITS, to_ms_dtype
from cogvlm2.cogvlm2_lora import LoRALinear, lora_parameters

__all__ = ["CausalLMLoss", "GradStep", "AdamW", "Trainable", "freeze_for_lora", "freeze_for_full",
           "enable_recompute"]


class CausalLMLoss(nn.Cell):
    """Token cross-entropy of a right-padded batch; shares ``model`` / ``lm_head`` (and their
    parameter names) with the CogVLM2ForVideo it is built from.

    input_ids (B, L) int32; vision_input: pixel values (T, 3, S, S) if ``vision_in_graph`` else vision
    embeddings (N, H); vision_index (N, 1); expert_mask (B, L); position_ids (B, L); bias (B, 1, L, L);
    past: empty cache (2*layers of (B, Hkv, 0, d)); label_index (M, 1) flat positions; targets (M,)
    int32; loss_scale () float32 -> (sum(ce) * loss_scale, ce (M,)).
    """

    def __init__(self, network: CogVLM2ForVideo, vision_in_graph: bool):
        super().__init__()
        self.model = network.model
        self.lm_head = network.lm_head
        self.vision_in_graph = vision_in_graph
        self.hidden_size = network.config.hidden_size

    def construct(self, input_ids, vision_input, vision_index, expert_mask, position_ids, bias, past,
                  label_index, targets, loss_scale):
        if self.vision_in_graph:
            vision = self.model.vision(vision_input).reshape(-1, self.hidden_size)   # (T*66, H)
        else:
            vision = vision_input                                                     # (N, H)
        hidden, _ = self.model(input_ids, vision, vision_index, expert_mask, position_ids, bias, past)  # (B*L, H)
        picked = ops.gather_nd(hidden, label_index)                                   # (M, H)
        logits = self.lm_head(picked).astype(ms.float32)                              # (M, vocab)
        target_logit = ops.gather_d(logits, 1, targets.reshape(-1, 1)).reshape(-1)    # (M,)
        ce = ops.logsumexp(logits, -1) - target_logit                                 # (M,)
        return ce.sum() * loss_scale, ce


class GradStep(nn.Cell):
    """(loss, per-token ce, gradients of loss w.r.t. ``weights``) in one compiled graph."""

    def __init__(self, loss: CausalLMLoss, weights: Sequence[Parameter]):
        super().__init__()
        self.loss = loss
        self.weights = ParameterTuple(weights)
        self.grad_fn = ms.value_and_grad(self.loss, None, self.weights, has_aux=True)

    @ms.jit
    def construct(self, input_ids, vision_input, vision_index, expert_mask, position_ids, bias, past,
                  label_index, targets, loss_scale):
        (loss, ce), grads = self.grad_fn(input_ids, vision_input, vision_index, expert_mask, position_ids, bias,
                                         past, label_index, targets, loss_scale)
        return loss, ce, grads

    def declare_dynamic_inputs(self, config, vision_in_graph: bool):
        dtype = to_ms_dtype(config.compute_dtype)
        kv = Tensor(shape=[None, config.num_multi_query_heads, None, config.head_dim], dtype=dtype)
        size = config.image_size
        vision = (Tensor(shape=[None, config.vision_config.in_channels, size, size], dtype=ms.float32)
                  if vision_in_graph else Tensor(shape=[None, config.hidden_size], dtype=dtype))
        self.set_inputs(
            Tensor(shape=[None, None], dtype=ms.int32), vision, Tensor(shape=[None, 1], dtype=ms.int32),
            Tensor(shape=[None, None], dtype=ms.float32), Tensor(shape=[None, None], dtype=ms.int32),
            Tensor(shape=[None, 1, None, None], dtype=ms.float32),
            mutable(tuple(kv for _ in range(2 * config.num_hidden_layers))),
            Tensor(shape=[None, 1], dtype=ms.int32), Tensor(shape=[None], dtype=ms.int32),
            Tensor(shape=[], dtype=ms.float32))


class AdamW:
    """torch.optim.AdamW (amsgrad off, single-tensor), step t:
    p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = v*b2 + (1-b2) g^2;
    p += -(lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps). Scalars are computed in Python doubles as
    torch does, then used in float32; every operation is a float32 numpy ufunc in torch's order.

    The update runs in numpy, one parameter at a time, over chunks of ``CHUNK`` elements on a few
    threads (numpy releases the GIL): a MindSpore graph over every parameter allocates all its
    intermediates at once (about ten copies of the trainable weights, 13+ GB for the 320M-parameter
    bench model), while this needs a few chunks of scratch memory beside the state. The new values go
    into the parameters through small assign graphs over groups of at most ``GROUP_BYTES`` (a host-side
    ``set_data`` is not seen by the dynamic-shape training graph on CPU, measured with MindSpore 2.7.2).
    State: ``exp_avg`` / ``exp_avg_sq`` float32 arrays (named ``exp_avg.<param>`` in checkpoints) and ``step``.
    """

    CHUNK = 1 << 22          # elements per numpy task
    GROUP_BYTES = 1 << 29    # new values written into the parameters per writer graph

    def __init__(self, params: Sequence[Parameter], betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, threads: int = 2, group_bytes: Optional[int] = None):
        self.params = list(params)
        self.exp_avg = [np.zeros(p.shape, np.float32) for p in self.params]
        self.exp_avg_sq = [np.zeros(p.shape, np.float32) for p in self.params]
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.threads = max(1, threads)
        self.step = 0
        self.names = [p.name for p in self.params]   # before a training graph prefixes them
        self._writers = [_ParamWriter(self.params, group)
                         for group in _groups(self.params, group_bytes or self.GROUP_BYTES)]

    def apply(self, grads, lr: float):
        """One update with learning rate ``lr``; ``grads`` numpy arrays or Tensors, in ``params`` order."""
        self.step += 1
        t = self.step
        bias_correction1 = 1 - self.beta1 ** t
        bias_correction2_sqrt = math.sqrt(1 - self.beta2 ** t)
        f32 = np.float32
        scalars = (f32(1 - lr * self.weight_decay), f32(1 - self.beta1), f32(self.beta2), f32(1 - self.beta2),
                   f32(-lr / bias_correction1), f32(bias_correction2_sqrt), f32(self.eps))
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(self.threads) as pool:
            for writer in self._writers:
                new_values = []
                for i in writer.indices:
                    param, m, v, grad = self.params[i], self.exp_avg[i], self.exp_avg_sq[i], grads[i]
                    grad = grad.asnumpy() if isinstance(grad, Tensor) else grad
                    grad = np.ascontiguousarray(grad, np.float32).reshape(-1)
                    value = param.asnumpy().astype(np.float32).reshape(-1)      # a fresh array (astype copies)
                    flat_m, flat_v = m.reshape(-1), v.reshape(-1)
                    spans = [slice(k, k + self.CHUNK) for k in range(0, value.size, self.CHUNK)]
                    list(pool.map(lambda s: _adamw_chunk(value[s], flat_m[s], flat_v[s], grad[s], *scalars), spans))
                    new_values.append(Tensor.from_numpy(value.reshape(param.shape)).astype(param.dtype))
                writer(mutable(tuple(new_values)))

    def state_arrays(self) -> Dict[str, np.ndarray]:
        """{exp_avg.<name> / exp_avg_sq.<name>: array} for a checkpoint."""
        out = {}
        for name, m, v in zip(self.names, self.exp_avg, self.exp_avg_sq):
            out[f"exp_avg.{name}"], out[f"exp_avg_sq.{name}"] = m, v
        return out

    def load_state_arrays(self, arrays: Dict[str, np.ndarray], step: int):
        for i, (param, base) in enumerate(zip(self.params, self.names)):
            for prefix, state in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                name = f"{prefix}.{base}"
                if name not in arrays or tuple(arrays[name].shape) != tuple(param.shape):
                    from cogvlm2.cogvlm2_errors import CheckpointError
                    raise CheckpointError(f"optimizer state lacks {name} (or has another shape): the checkpoint was "
                                          "written for other trainable parameters (pet_config / freeze_vision)")
                state[i] = np.array(arrays[name], np.float32)
        self.step = step


class _ParamWriter(nn.Cell):
    """Assigns new values to a group of parameters inside a graph."""

    def __init__(self, params: Sequence[Parameter], indices: List[int]):
        super().__init__()
        self.indices = indices
        self.targets = ParameterTuple([params[i] for i in indices])

    @ms.jit
    def construct(self, values):
        for i in range(len(self.targets)):
            ops.assign(self.targets[i], values[i])
        return True


def _groups(params: Sequence[Parameter], limit: int) -> List[List[int]]:
    """Consecutive parameter indices in groups of at most ``limit`` bytes (a larger parameter alone)."""
    groups, size = [[]], 0
    for i, p in enumerate(params):
        nbytes = p.size * 4
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    return [g for g in groups if g]


def _adamw_chunk(p, m, v, g, decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps):
    """In place on float32 views, torch's operation order: p = p*decay; m = m + (1-b1)*(g-m);
    v = v*b2 + (1-b2)*(g*g); p = p + neg_step * (m / (sqrt(v)/bc2 + eps))."""
    p *= decay
    d = g - m
    d *= one_minus_beta1
    m += d
    v *= beta2
    np.multiply(g, g, out=d)
    d *= one_minus_beta2
    v += d
    np.sqrt(v, out=d)
    d /= bc2_sqrt
    d += eps
    np.divide(m, d, out=d)
    d *= neg_step_size
    p += d


def freeze_for_lora(network) -> List[Parameter]:
    """Only LoRA weights train: everything else gets requires_grad False."""
    trainable = lora_parameters(network)
    for name, param in network.parameters_and_names():
        param.requires_grad = name in trainable
    return list(trainable.values())


def freeze_for_full(network, freeze_vision: bool) -> List[Parameter]:
    """Every parameter trains, except the vision tower's (``model.vision.*``) if ``freeze_vision``."""
    trainable = []
    for name, param in network.parameters_and_names():
        param.requires_grad = not (freeze_vision and name.startswith("model.vision."))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def enable_recompute(network: CogVLM2ForVideo, layers: Optional[int] = None) -> int:
    """Mark the first ``layers`` decoder layers (all if None) and every vision-tower layer for
    activation recompute (``Cell.recompute``: a layer's output is kept, its inside is recomputed in the
    backward pass). Only training graphs are affected: a forward-only graph keeps nothing anyway.
    Returns the number of cells marked; marking a cell twice is a no-op (MindSpore allows it once)."""
    decoder = list(network.model.layers)
    cells = decoder[:len(decoder) if layers is None else layers] + list(network.model.vision.transformer.layers)
    marked = 0
    for cell in cells:
        if not getattr(cell, "_cogvlm2_recompute", False):
            cell.recompute()
            object.__setattr__(cell, "_cogvlm2_recompute", True)
        marked += 1
    return marked


class Trainable:
    """A network with its trainable parameters and its training graphs.

    ``loss_and_grads(batches, total_labels)``: for micro-batches (``collate`` outputs) of one global
    batch, the summed loss contribution, the per-sample CE sums and the accumulated gradients of
    sum(ce) / total_labels (numpy, in ``self.params`` order). ``recompute``: True (every layer), an
    int (the first N decoder layers, as mindformers' per-stage count) or False.
    """

    def __init__(self, network: CogVLM2ForVideo, params: Sequence[Parameter], recompute=False):
        if any(p.dtype == BF16_BITS for p in network.get_parameters()):
            raise CogVLM2ConfigError(
                f"fine-tuning needs float32 weights, but model_config param_init_type is "
                f"{network.config.param_init_type} (Linear weights kept as bfloat16 bits are for inference on "
                "CPU); set param_init_type: float32 in the fine-tuning YAML")
        if recompute is True or (not isinstance(recompute, bool) and recompute):
            enable_recompute(network, None if recompute is True else int(recompute))
        self.network = network
        self.config = network.config
        self.params = list(params)
        names = {id(p): n for n, p in network.parameters_and_names()}
        self.names = [names[id(p)] for p in self.params]
        vision_ids = {id(p) for n, p in network.parameters_and_names() if n.startswith("model.vision.")}
        # the tower runs inside the graph only if one of its parameters trains (full FT, LoRA inside it)
        self.vision_trains = any(id(p) in vision_ids for p in self.params)
        self._steps = {}

    def _step(self, vision_in_graph: bool) -> GradStep:
        if vision_in_graph not in self._steps:
            step = GradStep(CausalLMLoss(self.network, vision_in_graph), self.params)
            step.declare_dynamic_inputs(self.config, vision_in_graph)
            self._steps[vision_in_graph] = step
        return self._steps[vision_in_graph]

    def micro_step(self, batch: Dict[str, np.ndarray], loss_scale: float):
        """One micro-batch -> (loss Tensor, ce (M,) numpy, grads tuple of Tensors)."""
        net, config = self.network, self.config
        dtype = to_ms_dtype(config.compute_dtype)
        pixels = batch["pixel_values"]
        vision_in_graph = self.vision_trains and pixels is not None
        if vision_in_graph:
            vision_input = Tensor(pixels.astype(np.float32))
        elif pixels is not None:
            vision_input = net.encode_video(pixels).reshape(-1, config.hidden_size)
        else:
            vision_input = Tensor(np.zeros((0, config.hidden_size), np.float32), dtype)
        b = batch["input_ids"].shape[0]
        loss, ce, grads = self._step(vision_in_graph)(
            Tensor(batch["input_ids"].astype(np.int32)), vision_input,
            Tensor(batch["vision_index"].astype(np.int32)), Tensor(batch["expert_mask"]),
            Tensor(batch["position_ids"].astype(np.int32)), Tensor(batch["bias"]), net.empty_cache(b),
            Tensor(batch["label_index"].astype(np.int32)), Tensor(batch["targets"].astype(np.int32)),
            Tensor(np.float32(loss_scale)))
        return loss, ce.asnumpy(), grads

    def loss_and_grads(self, batches: Sequence[Dict[str, np.ndarray]], total_labels: int,
                       reduce_grads=None):
        """Accumulate over micro-batches: (sum of ce / total_labels, per-sample CE sums list, grads).
        ``reduce_grads(list of numpy)`` (data parallel) sums gradients over ranks before returning."""
        loss_sum, sample_ce, grads = 0.0, [], None
        for batch in batches:
            loss, ce, step_grads = self.micro_step(batch, 1.0 / total_labels)
            loss_sum += float(ce.astype(np.float64).sum())
            sample_ce += [float(ce[batch["label_sample"] == i].astype(np.float64).sum())
                          for i in range(len(batch["n_label"]))]
            if grads is None:
                grads = [g.asnumpy().copy() for g in step_grads]
            else:
                for total, g in zip(grads, step_grads):
                    total += g.asnumpy()                              # in place: one copy of the gradients
            del loss, step_grads   # the graph's output buffers go back to its pool before the next micro-batch
        if reduce_grads is not None:
            grads = reduce_grads(grads)
        return loss_sum / total_labels, sample_ce, grads


def lora_modules(network) -> List[str]:
    return [path for path, cell in network.cells_and_names() if isinstance(cell, LoRALinear)]
