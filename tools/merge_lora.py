"""Merge a LoRA adapter (peft format) into its base model and write a full checkpoint directory.

    python tools/merge_lora.py --load_checkpoint BASE --adapter OUT/adapter --output_path MERGED --dtype bf16

BASE: a HF or converted CogVLM2 checkpoint directory. MERGED gets config.json + model.safetensors (HF
names and layout: W + (alpha/r) B A per adapted layer), loadable by ``from_pretrained``,
``run_predict.py --load_checkpoint`` and the engine. Written whole or not at all.
"""
import argparse
import os
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load_checkpoint", required=True, help="base model directory (HF or converted)")
    parser.add_argument("--adapter", required=True, help="peft adapter directory")
    parser.add_argument("--output_path", required=True, help="output directory (must not exist)")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"], help="output dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--verbose", action="store_true", help="show the traceback on errors")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cogvlm2.cogvlm2_cli import is_user_error, one_line
    start = time.time()
    try:
        if os.path.exists(args.output_path) and not args.overwrite:
            raise FileExistsError(17, "output exists; pass --overwrite to replace it", args.output_path)
        import mindspore as ms
        ms.set_context(mode=ms.GRAPH_MODE)
        from cogvlm2.cogvlm2 import CogVLM2ForVideo
        from cogvlm2.cogvlm2_checkpoints import save_hf_checkpoint
        from cogvlm2.cogvlm2_lora import load_adapter, merge_lora
        model = CogVLM2ForVideo.from_pretrained(args.load_checkpoint, compute_dtype="float32",
                                                param_init_type="float32")
        config = load_adapter(model, args.adapter)
        merge_lora(model)
        save_hf_checkpoint(model, args.output_path, args.dtype)
    except Exception as err:   # the plugin's error family and OSError: one line, exit code 2
        if args.verbose or not is_user_error(err):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} ({config.describe()}) into {args.load_checkpoint} -> {args.output_path} "
          f"({args.dtype}) in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
