"""Convert a HF CogVLM2-Video checkpoint into a MindSpore checkpoint directory.

    python tools/convert_weight.py --model cogvlm2 --input_path HF_DIR --output_path OUT --dtype bf16

HF_DIR holds config.json, model.safetensors.index.json and the shards (as downloaded from
THUDM/cogvlm2-video-llama3-chat). OUT receives config.json, mindspore_model.index.json and one
MindSpore safetensors file per input shard; load it with ``CogVLM2ForVideo.from_pretrained(OUT)`` or
``--load_checkpoint OUT``. Memory: about one input shard; the output appears only when complete.
"""
import argparse
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cogvlm2", choices=["cogvlm2"], help="model family")
    parser.add_argument("--input_path", required=True, help="HF checkpoint directory")
    parser.add_argument("--output_path", required=True,
                        help="output directory (must not exist); always a directory, even if named .ckpt")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"],
                        help="parameter dtype of the output (default bf16, as the HF checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--verbose", action="store_true", help="show the traceback on errors")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm
    from cogvlm2.cogvlm2_convert import convert_checkpoint
    from cogvlm2.cogvlm2_errors import CogVLM2Error

    start = time.time()
    try:
        weight_map = convert_checkpoint(
            args.input_path, args.output_path, dtype=args.dtype, overwrite=args.overwrite,
            progress=lambda shards: tqdm(shards, desc="converting shards", unit="shard", file=sys.stderr))
    except CogVLM2Error as err:
        if args.verbose:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (nothing was written)", file=sys.stderr)
        return 130
    print(f"converted {len(weight_map)} tensors to {args.output_path} ({args.dtype}) "
          f"in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
