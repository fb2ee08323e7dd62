"""mindformers integration: registration, the YAML configs, and the predict flow of
run_mindformer.py (build_context, then Trainer(config).predict) with mindformers' own functions.

mindformers writes into the working directory (output/, modules/ for auto_register, the result
file), so every flow test runs in a temporary directory.
"""
import os

import numpy as np
import pytest

from cogvlm2 import CogVLM2Config, CogVLM2ForVideo, CogVLM2Processor, CogVLM2Tokenizer
from cogvlm2.cogvlm2_mindformers import (TASK, CogVLM2VideoPipeline, generation_defaults, model_inputs)
from cogvlm2.cogvlm2_weights import CheckpointError
from mindformers.mindformer_book import MindFormerBook
from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
TINY = os.path.join(FIXTURES, "tiny_chat")
VIDEO = os.path.join(FIXTURES, "bigbuckbunny.mp4")
PROMPT = "Please describe this video."
TINY_YAML = os.path.join(REPO, "configs", "cogvlm2", "predict_cogvlm2_video_tiny.yaml")
REAL_YAML = os.path.join(REPO, "configs", "cogvlm2", "predict_cogvlm2_video_llama3_chat_13b.yaml")


@pytest.fixture(autouse=True)
def mindformers_output(tmp_path, monkeypatch):
    """mindformers' logger writes to $LOCAL_DEFAULT_PATH/log (default ./output): keep it out of the repo.
    (set_output_path changes the variable; monkeypatch restores it.)"""
    monkeypatch.setenv("LOCAL_DEFAULT_PATH", str(tmp_path / "output"))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory, and the environment run_mindformer.py --register_path <repo> sets."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REGISTER_PATH", REPO)
    monkeypatch.syspath_prepend(REPO)
    return tmp_path


def run_trainer_predict(load_checkpoint, input_data, batch_size=1, **model_config):
    """What run_mindformer.py --run_mode predict does after parsing its flags (``model_config``: YAML
    model_config values to change)."""
    from mindformers.core.context import build_context
    from mindformers.trainer import Trainer
    from mindformers.utils.file_utils import set_output_path
    config = MindFormerConfig(TINY_YAML)
    for key, value in model_config.items():
        config.model.model_config[key] = value
    config.load_checkpoint = load_checkpoint
    config.input_data = input_data
    config.predict_batch_size = batch_size
    set_output_path(config.output_dir)
    build_context(config)
    trainer = Trainer(config)
    return trainer.predict(predict_checkpoint=config.load_checkpoint, input_data=config.input_data,
                           batch_size=config.predict_batch_size, adapter_id=None)


# ----- registration and configs ------------------------------------------------------------------
def test_import_registers_everything():
    expected = [(MindFormerModuleType.CONFIG, "CogVLM2Config", CogVLM2Config),
                (MindFormerModuleType.MODELS, "CogVLM2ForVideo", CogVLM2ForVideo),
                (MindFormerModuleType.TOKENIZER, "CogVLM2Tokenizer", CogVLM2Tokenizer),
                (MindFormerModuleType.PROCESSOR, "CogVLM2Processor", CogVLM2Processor),
                (MindFormerModuleType.PIPELINE, TASK, CogVLM2VideoPipeline)]
    for module_type, name, cls in expected:
        assert MindFormerRegister.get_cls(module_type, name) is cls
    common = MindFormerBook.get_pipeline_support_task_list()[TASK]["common"]
    assert MindFormerConfig(common).processor.tokenizer.type == "CogVLM2Tokenizer"


def test_yaml_configs_build_the_models_they_describe():
    """mindformers' builders turn each YAML into our classes, with the sizes of its checkpoint."""
    from mindformers.models.build_config import build_model_config
    from mindformers.models.build_processor import build_processor
    tiny = build_model_config(MindFormerConfig(TINY_YAML).model.model_config)
    assert tiny.to_hf_dict() == CogVLM2Config.from_hf_config(TINY).to_hf_dict()
    real = build_model_config(MindFormerConfig(REAL_YAML).model.model_config)
    assert real.to_hf_dict() == CogVLM2Config().to_hf_dict()     # the defaults are the real model
    assert (real.use_past, real.is_dynamic, real.compute_dtype) == (True, True, "bfloat16")
    assert generation_defaults(real) == {"max_length": 2048, "do_sample": False, "top_k": 1, "top_p": 1.0,
                                         "repetition_penalty": 1.0}
    assert generation_defaults(tiny)["max_new_tokens"] == 20
    processor_config = MindFormerConfig(REAL_YAML).processor
    processor_config.tokenizer.pop("auto_register")     # tested in the Trainer flow (it writes ./modules)
    processor = build_processor(processor_config)
    assert isinstance(processor, CogVLM2Processor) and isinstance(processor.tokenizer, CogVLM2Tokenizer)
    assert (processor.template_version, processor.num_frames, processor.max_length) == ("chat", 24, 2048)
    context = MindFormerConfig(REAL_YAML).context
    assert context.device_target == "Ascend"


def test_model_inputs_drop_what_the_model_does_not_take():
    inputs = {"input_ids": np.ones((2, 3)), "pixel_values": np.zeros((3, 3, 4, 4)),
              "frame_indices": np.arange(3), "frames_per_sample": np.array([1, 2]), "raw_query": ["q"]}
    assert sorted(model_inputs(inputs)) == ["frame_indices", "frames_per_sample", "input_ids", "pixel_values"]


# ----- the Trainer flow --------------------------------------------------------------------------
def test_trainer_predict_answers_like_the_reference(workdir, meta):
    """HF checkpoint directory; the YAML's auto_register imports the plugin through REGISTER_PATH."""
    result = run_trainer_predict(TINY, [[{"video": VIDEO}, {"text": PROMPT}]])
    assert result == [meta["gen_decoded"]]
    with open(workdir / f"{TASK}_result.txt", encoding="utf-8") as f:
        assert f.read() == str([meta["gen_decoded"]])
    assert (workdir / "modules" / "openmind_modules" / os.path.basename(REPO) / "cogvlm2_register.py").is_file()


def test_trainer_predict_keeps_bfloat16_weights(workdir, meta, monkeypatch):
    """param_init_type: bfloat16: mindformers' loading of the HF directory (convert_weight_dict) keeps the
    Linear weights as their bfloat16 bits, and the answer is the reference's."""
    from cogvlm2 import cogvlm2_weights
    from cogvlm2.cogvlm2_layers import BF16_BITS
    kept = []
    convert = cogvlm2_weights.convert_weight_dict

    def recording(model, source_dict):
        converted = convert(model, source_dict)
        kept.extend(name for name, value in converted.items() if value.dtype == BF16_BITS)
        return converted

    monkeypatch.setattr(cogvlm2_weights, "convert_weight_dict", recording)
    result = run_trainer_predict(TINY, [[{"video": VIDEO}, {"text": PROMPT}]], param_init_type="bfloat16")
    assert result == [meta["gen_decoded"]]
    assert "lm_head.weight" in kept and "model.vision.linear_proj.dense_4h_to_h.weight" in kept


def test_trainer_predict_converted_checkpoint_in_batches(workdir, meta):
    """A tools/convert_weight.py directory, two questions (video and text only) in one batch."""
    from cogvlm2.cogvlm2_convert import convert_checkpoint
    converted = str(workdir / "converted")
    convert_checkpoint(TINY, converted, dtype="bf16")
    result = run_trainer_predict(converted, [[{"video": VIDEO}, {"text": PROMPT}], [{"text": PROMPT}]],
                                 batch_size=2)
    assert result == [meta["gen_decoded"], meta["text_gen_decoded"]]


def test_trainer_predict_refuses_incomplete_checkpoint(workdir):
    """mindformers would fill the missing weights with random values and only warn."""
    from cogvlm2.cogvlm2_convert import convert_checkpoint
    converted = workdir / "converted"
    convert_checkpoint(TINY, str(converted), dtype="fp32")
    (converted / "mindspore_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"parameters are not in the checkpoint, first model\."):
        run_trainer_predict(str(converted), [[{"video": VIDEO}, {"text": PROMPT}]])
    assert not (workdir / f"{TASK}_result.txt").exists()


def test_trainer_predict_refuses_foreign_hf_checkpoint(workdir):
    """A HF directory with a tensor the model does not have."""
    from safetensors.numpy import save_file
    foreign = workdir / "foreign"
    foreign.mkdir()
    save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32),
               "transformer.h.0.attn.c_attn.weight": np.zeros((4, 4), np.float32)},
              str(foreign / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown tensor transformer.h.0.attn.c_attn.weight"):
        run_trainer_predict(str(foreign), [[{"text": PROMPT}]])


def test_pipeline_takes_generation_options(meta):
    """mindformers.pipeline() with a built model; options given to the call override the YAML's."""
    from mindformers import pipeline
    model = CogVLM2ForVideo.from_pretrained(TINY)
    processor = CogVLM2Processor(CogVLM2Tokenizer())
    pipe = pipeline(task=TASK, model=model, processor=processor)
    assert isinstance(pipe, CogVLM2VideoPipeline)
    answer = pipe([[{"text": PROMPT}]], max_new_tokens=5)
    assert answer == [processor.tokenizer.decode(meta["text_gen_new_tokens"][:5])]
