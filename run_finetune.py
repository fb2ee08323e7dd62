"""Fine-tune CogVLM2-Video (LoRA or full) on an ms-swift JSONL dataset.

    python run_finetune.py --config configs/cogvlm2/finetune_cogvlm2_video_tiny_lora.yaml \\
        --load_checkpoint tests/fixtures/tiny_chat --train_dataset data.jsonl --output_dir out \\
        [--init_adapter DIR] [--resume | --overwrite] [--skip_bad_samples]

Data parallel over N processes (gradients and label-token counts are summed; rank 0 writes):

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=msrun_log --join=True \\
        run_finetune.py --config ... --train_dataset data.jsonl --output_dir out

data.jsonl: one ``{"query": ..., "response": ..., "history": [[q, a], ...]?, "videos": ["clip.mp4"]? |
"images": [...]?}`` per line, media paths relative to the file. OUT gets ``adapter/`` (peft format;
LoRA) or ``checkpoint/`` (HF format; full), ``train_log.jsonl`` (one line per step) and
``checkpoints/step_N`` (weights + optimizer state, for ``--resume``).
"""
import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="finetune YAML (configs/cogvlm2/finetune_*.yaml)")
    parser.add_argument("--load_checkpoint", default=None, help="base model directory (HF or converted)")
    parser.add_argument("--train_dataset", required=True, help="JSONL dataset (ms-swift format)")
    parser.add_argument("--output_dir", required=True, help="where adapter/ or checkpoint/, logs and checkpoints go")
    parser.add_argument("--init_adapter", default=None, help="start LoRA from this peft adapter directory")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    parser.add_argument("--skip_bad_samples", action="store_true",
                        help="skip (and count) samples whose media is missing/corrupt or that exceed the context")
    parser.add_argument("--output_dtype", default=None, choices=["fp32", "fp16", "bf16"],
                        help="dtype of a full fine-tuning checkpoint (default: the model's param_init_type)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show the traceback on errors")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cogvlm2.cogvlm2_cli import interrupt_on_signals, is_user_error, one_line
    from cogvlm2.cogvlm2_finetune import finetune
    try:
        with interrupt_on_signals():
            summary = finetune(args.config, args.train_dataset, args.output_dir, args.load_checkpoint,
                               init_adapter=args.init_adapter, resume=args.resume, overwrite=args.overwrite,
                               skip_bad_samples=args.skip_bad_samples, progress=not args.no_progress,
                               output_dtype=args.output_dtype)
    except KeyboardInterrupt:
        print("interrupted: continue with --resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:   # the plugin's error family and OSError: one line, exit code 2
        if args.verbose or not is_user_error(err):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    if summary["rank"] == 0:
        skipped = summary["skipped"]
        note = f"; skipped {len(skipped)} bad samples (lines {sorted(skipped)})" if skipped else ""
        last = f"{summary['losses'][-1]:.6f}" if summary["losses"] else "n/a"
        print(f"trained {summary['steps']} steps (last loss {last}) -> {summary['output']}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
