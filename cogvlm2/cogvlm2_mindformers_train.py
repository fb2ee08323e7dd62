"""mindformers' fine-tuning flow: ``run_mindformer.py --run_mode finetune`` / ``Trainer(config).finetune``.

``Trainer(config)`` builds the trainer named by the YAML's ``trainer.type``; its ``finetune`` (and
``train``) end in ``trainer.train(config=..., network=..., dataset=..., ...)``. mindformers' own
``MultiModalToTextGenerationTrainer.train`` runs the generic ``training_process`` (a MindSpore
``GeneratorDataset`` of fixed-shape columns, ``TrainOneStepCell`` around ``network.construct``),
which knows nothing of this model's inputs: variable-length video+text samples, vision embeddings
scattered into the token sequence, a loss over the label positions only. ``CogVLM2FinetuneTrainer``
is that trainer with ``train`` running this plugin's loop (``cogvlm2_finetune.finetune``) on the
config mindformers hands it; ``predict`` stays mindformers' (``cogvlm2_mindformers``).

YAML (the finetune YAMLs in configs/cogvlm2/ set it):

    trainer: {type: CogVLM2FinetuneTrainer, model_name: ...}
    train_dataset: {data_loader: {dataset_dir: data.jsonl}}   # or run_mindformer.py --train_dataset_dir
    finetune: {..., init_adapter: DIR?, skip_bad_samples: false}

Outputs go to ``<output_dir>/finetune`` (mindformers writes its own logs and strategy folders into
``output_dir``); ``resume_training: True`` (``--resume_training True``) continues from its last
checkpoint. The checkpoint is ``load_checkpoint`` (``--load_checkpoint``).
"""
import os

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindformers.trainer.multi_modal_to_text_generation import MultiModalToTextGenerationTrainer

from cogvlm2.cogvlm2_errors import CogVLM2ConfigError
from cogvlm2.cogvlm2_finetune import finetune

__all__ = ["CogVLM2FinetuneTrainer", "OUTPUT_SUBDIR"]

OUTPUT_SUBDIR = "finetune"


@MindFormerRegister.register(MindFormerModuleType.TRAINER)
class CogVLM2FinetuneTrainer(MultiModalToTextGenerationTrainer):
    """mindformers' multi-modal trainer whose ``train`` is the CogVLM2 fine-tuning loop."""

    def train(self, config=None, network=None, dataset=None, optimizer=None, wrapper=None, callbacks=None,
              **kwargs):
        del optimizer, wrapper, callbacks, kwargs   # the YAML's optimizer/lr_schedule/finetune sections drive the loop
        if network is not None or dataset is not None:
            raise CogVLM2ConfigError("CogVLM2FinetuneTrainer builds the network and the dataset from the YAML; "
                                     "pass Trainer(config) without model= or train_dataset= instances")
        self.config = config
        section = config.get("finetune") or {}
        loader = (config.get("train_dataset") or {}).get("data_loader") or {}
        data = loader.get("dataset_dir")
        if not data:
            raise CogVLM2ConfigError("no training data: set train_dataset.data_loader.dataset_dir in the YAML or "
                                     "pass run_mindformer.py --train_dataset_dir data.jsonl (ms-swift JSONL)")
        checkpoint = config.get("load_checkpoint") or None
        resume = bool(config.get("resume_training"))
        return finetune(config, data, os.path.join(config.output_dir, OUTPUT_SUBDIR), checkpoint,
                        init_adapter=section.get("init_adapter") or None, resume=resume,
                        skip_bad_samples=bool(section.get("skip_bad_samples", False)), progress=True,
                        set_context=False)
