"""CogVLM2 configuration: one class for the HF ``config.json`` and the mindformers YAML ``model_config``.

The defaults are the real CogVLM2-Video-Llama3-Chat model (THUDM/cogvlm2-video-llama3-chat).
``CogVLM2Config.from_hf_config(path)`` reads a HF ``config.json``; a YAML ``model_config`` passes the
same keys as keyword arguments (mindformers builds it through ``MindFormerRegister``).
"""
import json
import os

from mindformers.models.configuration_utils import PretrainedConfig
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from cogvlm2.cogvlm2_errors import CogVLM2ConfigError
from cogvlm2.cogvlm2_cpu_kernels import (DECODE_MATMUL_CHOICES, GEMM_CHOICES, KERNEL_THREADS_CHOICES,
                                         KV_CACHE_CHOICES, DECODER_KERNELS_CHOICES, VISION_KERNELS_CHOICES)

__all__ = ["CogVLM2Config", "CogVLM2VisionConfig", "CogVLM2ConfigError"]  # the error: re-exported

# HF config.json keys that describe the checkpoint file, not the network.
# (batch_size: the batch is per call; mindformers YAMLs of 1.3 still set it.)
_HF_IGNORED_KEYS = ("architectures", "auto_map", "torch_dtype", "transformers_version",
                    "initializer_range", "use_cache", "tie_word_embeddings", "model_type", "batch_size")
# What the network implements; a config asking for anything else is refused, not ignored.
DECODER_ACT, VISION_ACT = "silu", "gelu"


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class CogVLM2VisionConfig(PretrainedConfig):
    """EVA2-CLIP-E vision tower (HF ``vision_config``). Defaults: the real 63-layer tower."""

    model_type = "cogvlm2_vision"

    def __init__(self,
                 image_size: int = 224,
                 patch_size: int = 14,
                 in_channels: int = 3,
                 hidden_size: int = 1792,
                 intermediate_size: int = 15360,
                 num_heads: int = 16,
                 num_hidden_layers: int = 63,
                 layer_norm_eps: float = 1e-6,
                 hidden_act: str = VISION_ACT,
                 num_positions: int = 257,
                 **kwargs):
        kwargs.pop("dropout_prob", None)   # HF config.json key; inference has no dropout
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_heads = num_heads
        self.num_hidden_layers = num_hidden_layers
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.num_positions = num_positions

    @property
    def grid_size(self) -> int:
        """Patches per side of a frame: 224 / 14 = 16."""
        return self.image_size // self.patch_size


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class CogVLM2Config(PretrainedConfig):
    """CogVLM2: Llama-3 visual-expert decoder + EVA2-CLIP-E tower + conv/GLU adapter.

    Text keys follow the HF ``config.json``; ``vision_config`` is a dict or a ``CogVLM2VisionConfig``.
    ``expert_set`` picks the decoder experts: ``"language"`` (the video model: every token uses the
    language expert) or ``"vision_language"`` (the image model CogVLM2-19B: VISION tokens use the
    ``vision_expert_*`` weights).
    """

    model_type = "cogvlm2"

    def __init__(self,
                 vocab_size: int = 128256,
                 hidden_size: int = 4096,
                 intermediate_size: int = 14336,
                 num_hidden_layers: int = 32,
                 num_attention_heads: int = 32,
                 num_multi_query_heads: int = 8,
                 rms_norm_eps: float = 1e-5,
                 hidden_act: str = DECODER_ACT,
                 rope_theta: float = 500000.0,
                 max_position_embeddings: int = 2048,
                 bos_token_id: int = 128000,
                 eos_token_id: int = 128001,
                 pad_token_id: int = 128002,
                 eot_token_id: int = 128009,
                 stop_token_ids=(128001, 128009),
                 template_version: str = "chat",
                 num_frames: int = 24,
                 vision_batch_frames: int = 6,
                 adapter_conv_size: int = 2,
                 adapter_layer_norm_eps: float = 1e-5,
                 expert_set: str = "language",
                 vision_config=None,
                 compute_dtype: str = "float32",
                 param_init_type: str = "float32",
                 use_past: bool = True,
                 is_dynamic: bool = True,
                 use_flash_attention: bool = False,
                 max_batch_size: int = 8,
                 vision_cache_mb: float = 512,
                 decode_matmul: str = "auto",
                 kv_cache: str = "auto",
                 vision_kernels: str = "auto",
                 decoder_kernels: str = "auto",
                 gemm: str = "auto",
                 kernel_threads: str = "auto",
                 **kwargs):
        # mindformers YAML spellings of the same values
        num_hidden_layers = kwargs.pop("num_layers", num_hidden_layers)
        num_attention_heads = kwargs.pop("num_heads", num_attention_heads)
        num_multi_query_heads = kwargs.pop("n_kv_heads", num_multi_query_heads)
        max_position_embeddings = kwargs.pop("seq_length", max_position_embeddings)
        for key in _HF_IGNORED_KEYS:
            kwargs.pop(key, None)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_multi_query_heads = num_multi_query_heads
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.eot_token_id = eot_token_id
        self.stop_token_ids = list(stop_token_ids)
        self.template_version = template_version
        self.num_frames = num_frames
        # frames per vision-tower call: a static (vision_batch_frames, 3, 224, 224) graph; left-over
        # frames go in chunks of half as many, down to one (6: graphs of 6, 3 and 1 frames). On CPU the
        # bench tower ran 6 frames 1.2x slower one frame per call than 3 per call, and 1.07x faster in
        # one call of 6 than in two of 3 (with the AMX product, one process).
        self.vision_batch_frames = vision_batch_frames
        self.adapter_conv_size = adapter_conv_size
        self.adapter_layer_norm_eps = adapter_layer_norm_eps
        self.expert_set = expert_set
        if vision_config is None:
            vision_config = {}
        if isinstance(vision_config, dict):
            vision_config = CogVLM2VisionConfig(**vision_config)
        self.vision_config = vision_config
        self.compute_dtype = compute_dtype
        self.param_init_type = param_init_type
        self.use_past = use_past
        self.is_dynamic = is_dynamic
        self.use_flash_attention = use_flash_attention
        self.max_batch_size = max_batch_size      # sequences the engine decodes together
        self.vision_cache_mb = vision_cache_mb    # bound of the engine's vision-embedding LRU cache
        # the decode step's MatMul: "rows" = the rows kernel (cogvlm2_cpu_kernels, float32 CPU), which
        # reads each weight once for all <= 16 rows, where MindSpore 2.7.2's oneDNN re-reads it for
        # 2-15 rows (a batch-8 step cost 2-3.4x a batch-1 step); "onednn" = ops.MatMul; "auto" = rows
        # on CPU if it builds (g++), onednn elsewhere (Ascend). Prefill uses ``gemm``.
        self.decode_matmul = decode_matmul
        # the decode KV cache of the engine and of cogvlm2.generate: "slots" = a slot per running
        # sequence, written in place by the decode attention kernel (cogvlm2_kv_cache, float32 CPU);
        # "concat" = the functional cache the step graph extends by concat (every backend; each step
        # copies every row's cache); "auto" = slots on CPU if it builds, concat elsewhere. Prefill always
        # runs the step graph on the functional cache.
        self.kv_cache = kv_cache
        # the vision tower's and adapter's GELU, LayerNorm, attention and SiLU * up: "fused" = one-pass CPU
        # kernels (cogvlm2_cpu_kernels, float32 CPU; MindSpore 2.7.2 runs exact GELU as four kernels with a
        # scalar erf, and its CPU LayerNorm slowly: 26% of the bench tower); "ops" = MindSpore's ops
        # (every backend); "auto" = fused on CPU if it builds, ops elsewhere.
        self.vision_kernels = vision_kernels
        # the decoder's RMSNorm and silu(gate) * up, and its attention in the causal-LM step graphs
        # (prefill, functional-cache decode): "fused" = one-pass CPU kernels (cogvlm2_cpu_kernels; float32
        # CPU; the attention skips the keys a causal mask hides, and training keeps the portable one);
        # "ops" = MindSpore's ops (every backend); "auto" = fused on CPU if it builds, ops elsewhere.
        self.decoder_kernels = decoder_kernels
        # the products of many rows (the vision tower, the adapter, prefill): "amx" = the AMX bf16 tile
        # kernel at float32 accuracy (three bf16 parts per value, cogvlm2_cpu_kernels; float32 CPU with
        # AMX-BF16, e.g. Xeon Sapphire Rapids); "onednn" = ops.MatMul (every backend); "auto" = amx where
        # the CPU and Linux allow it and the kernels build, onednn elsewhere.
        self.gemm = gemm
        # MindSpore's CPU kernel threads: "pinned" = one to a CPU of the process from the first kernel
        # call (left to the scheduler, two shared one CPU in 30-48% of the bench tower's encodes, 1.25-1.6x
        # slower; cogvlm2_cpu_kernels.set_kernel_threads, float32 CPU, process-wide); "free" = left to the
        # scheduler (every backend); "auto" = pinned on CPU if the kernels build, free elsewhere. Only a
        # pool with as many threads as the process has CPUs is pinned.
        self.kernel_threads = kernel_threads
        self.validate()

    # ----- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_size(self) -> int:
        """Width of k (and of v) in the fused qkv projection: kv heads * head_dim."""
        return self.num_multi_query_heads * self.head_dim

    @property
    def vision_tokens_per_frame(self) -> int:
        """boi + (grid / conv)^2 patches + eoi: 1 + 8*8 + 1 = 66 for the real model."""
        side = self.vision_config.grid_size // self.adapter_conv_size
        return side * side + 2

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    def validate(self):
        """Reject values that cannot build the network, naming the key and the fix."""
        v = self.vision_config
        checks = [
            (self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size {self.hidden_size} must be divisible by num_attention_heads {self.num_attention_heads}"),
            (self.num_attention_heads % self.num_multi_query_heads == 0,
             f"num_attention_heads {self.num_attention_heads} must be a multiple of "
             f"num_multi_query_heads {self.num_multi_query_heads}"),
            (self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for rotary embeddings"),
            (v.hidden_size % v.num_heads == 0,
             f"vision_config.hidden_size {v.hidden_size} must be divisible by vision_config.num_heads {v.num_heads}"),
            (v.image_size % v.patch_size == 0,
             f"vision_config.image_size {v.image_size} must be a multiple of patch_size {v.patch_size}"),
            (v.num_positions == v.grid_size ** 2 + 1,
             f"vision_config.num_positions {v.num_positions} must be (image_size/patch_size)^2 + 1 = "
             f"{v.grid_size ** 2 + 1}"),
            (v.grid_size % self.adapter_conv_size == 0,
             f"adapter_conv_size {self.adapter_conv_size} must divide the patch grid {v.grid_size}"),
            (not self.use_flash_attention,
             "use_flash_attention: fused Ascend attention is not part of this plugin; set it to False "
             "(the portable attention runs on Ascend and CPU)"),
            (self.hidden_act == DECODER_ACT,
             f"hidden_act {self.hidden_act!r}: the CogVLM2 decoder MLP is SwiGLU ({DECODER_ACT!r})"),
            (v.hidden_act == VISION_ACT,
             f"vision_config.hidden_act {v.hidden_act!r}: the EVA2-CLIP tower uses exact GELU ({VISION_ACT!r})"),
            (isinstance(self.max_batch_size, int) and self.max_batch_size >= 1,
             f"max_batch_size {self.max_batch_size!r} must be an integer >= 1"),
            (isinstance(self.vision_cache_mb, (int, float)) and self.vision_cache_mb >= 0,
             f"vision_cache_mb {self.vision_cache_mb!r} must be a number >= 0 (0 turns the cache off)"),
            (self.decode_matmul in DECODE_MATMUL_CHOICES,
             f"decode_matmul {self.decode_matmul!r} must be one of {list(DECODE_MATMUL_CHOICES)}"),
            (self.kv_cache in KV_CACHE_CHOICES,
             f"kv_cache {self.kv_cache!r} must be one of {list(KV_CACHE_CHOICES)}"),
            (self.vision_kernels in VISION_KERNELS_CHOICES,
             f"vision_kernels {self.vision_kernels!r} must be one of {list(VISION_KERNELS_CHOICES)}"),
            (self.decoder_kernels in DECODER_KERNELS_CHOICES,
             f"decoder_kernels {self.decoder_kernels!r} must be one of {list(DECODER_KERNELS_CHOICES)}"),
            (self.gemm in GEMM_CHOICES, f"gemm {self.gemm!r} must be one of {list(GEMM_CHOICES)}"),
            (self.kernel_threads in KERNEL_THREADS_CHOICES,
             f"kernel_threads {self.kernel_threads!r} must be one of {list(KERNEL_THREADS_CHOICES)}"),
            (self.expert_set in ("language", "vision_language"),
             f"expert_set {self.expert_set!r} must be 'language' (video model) or 'vision_language' (image model)"),
        ]
        for ok, message in checks:
            if not ok:
                raise CogVLM2ConfigError(f"invalid CogVLM2 config: {message}")

    # ----- HF config.json ------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, path: str, **overrides) -> "CogVLM2Config":
        """Read a HF ``config.json`` (or the directory holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise CogVLM2ConfigError(f"{path}: no config.json here; point to a CogVLM2 HF checkpoint directory")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, ValueError) as err:
            raise CogVLM2ConfigError(f"{path}: not a readable JSON config ({err})") from err
        architectures = values.get("architectures") or []
        if architectures and not any(a.startswith("CogVLM") for a in architectures):
            raise CogVLM2ConfigError(f"{path}: architectures {architectures} is not a CogVLM2 model")
        values.update(overrides)
        return cls(**values)

    def to_hf_dict(self) -> dict:
        """The HF ``config.json`` keys of this config (written next to converted checkpoints)."""
        v = self.vision_config
        return {
            "architectures": ["CogVLMVideoForCausalLM" if self.expert_set == "language"
                              else "CogVLMForCausalLM"],
            "model_type": "cogvlm2",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_multi_query_heads": self.num_multi_query_heads, "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "eot_token_id": self.eot_token_id,
            "template_version": self.template_version, "num_frames": self.num_frames,
            "adapter_conv_size": self.adapter_conv_size,
            "adapter_layer_norm_eps": self.adapter_layer_norm_eps, "expert_set": self.expert_set,
            "vision_config": {
                "image_size": v.image_size, "patch_size": v.patch_size, "in_channels": v.in_channels,
                "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads, "num_hidden_layers": v.num_hidden_layers,
                "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
                "num_positions": v.num_positions,
            },
        }

    def save_hf_config(self, directory: str):
        """Write ``config.json`` atomically into ``directory``."""
        path = os.path.join(directory, "config.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
        os.replace(tmp, path)
