"""Answer a question about a video with CogVLM2-Video, configured by a mindformers YAML file.

    python run_predict.py --config configs/cogvlm2/predict_cogvlm2_video_tiny.yaml \\
        --predict_data tests/fixtures/bigbuckbunny.mp4 "Please describe this video." --modal_type video text

The flags are those of mindformers' run_mindformer.py in predict mode (that script is not in the
mindformers wheel), plus --max_new_tokens, --stream and --verbose. The answer goes to stdout (and,
as mindformers does, into the result file: ``save_file`` of the config or
./multi_modal_to_text_generation_result.txt); progress goes to stderr.

The answers come from ``CogVLM2Engine`` (the same engine the server and the dataset job use):
--predict_batch_size questions are decoded together (continuous batching).

Dataset mode: when --predict_data is one ``.jsonl`` file (or a folder of videos plus --prompt), every
line is answered into --output_file, resumably, and under ``msrun`` each rank takes a shard
(see cogvlm2/cogvlm2_dataset.py and the README's "Captioning a video collection")::

    python run_predict.py --load_checkpoint DIR --predict_data data.jsonl --output_file answers.jsonl
    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --log_dir=msrun_log --join=True \
        run_predict.py --load_checkpoint DIR --predict_data data.jsonl --output_file answers.jsonl

--predict_data / --modal_type pair up item by item. Each query is an optional video (or image)
followed by its question, so ``a.mp4 "Q1" b.mp4 "Q2" --modal_type video text video text`` asks two
questions, answered in batches of --predict_batch_size.
"""
import argparse
import contextlib
import json
import os
import sys
import threading
import time

TASK = "multi_modal_to_text_generation"
MODAL_FILE_TYPES = {
    "video": (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".wmv"),
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"),
}
MODAL_TYPES = ("video", "image", "text")
FILE_PERMISSION = 0o640   # what mindformers uses for its result file


class UsageError(Exception):
    """A bad flag or input file, reported as one line (exit code 2), like the plugin's CogVLM2Error."""


# ----- command line ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python run_predict.py --config configs/cogvlm2/predict_cogvlm2_video_tiny.yaml "
               "--predict_data tests/fixtures/bigbuckbunny.mp4 \"Please describe this video.\" "
               "--modal_type video text")
    parser.add_argument("--config", default=None,
                        help="YAML config (configs/cogvlm2/predict_*.yaml); optional with --load_checkpoint DIR "
                             "(sizes and template then come from the checkpoint's config.json)")
    parser.add_argument("--run_mode", default="predict", help="only 'predict' (the default)")
    parser.add_argument("--predict_data", nargs="+", required=True,
                        help="video/image paths and questions, e.g. video.mp4 \"Describe this video.\"")
    parser.add_argument("--modal_type", nargs="+", default=None,
                        help="the type of each --predict_data item: video, image or text "
                             "(default: text for a single item)")
    parser.add_argument("--load_checkpoint", default=None,
                        help="checkpoint directory: a HF download (config.json + model.safetensors.index.json "
                             "+ shards) or the output of tools/convert_weight.py (default: the config's)")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter directory (peft format: adapter_config.json + "
                             "adapter_model.safetensors, e.g. run_finetune.py's OUT/adapter), applied unmerged")
    parser.add_argument("--device_target", default=None, choices=["CPU", "Ascend", "GPU"],
                        help="overrides context.device_target")
    parser.add_argument("--device_id", default=None, type=int, help="overrides context.device_id")
    parser.add_argument("--predict_batch_size", default=None, type=int,
                        help="questions answered together (default: the config's predict_batch_size, else 1; "
                             "in dataset mode the model config's max_batch_size, 8 unless set)")
    parser.add_argument("--register_path", default=None,
                        help="accepted for run_mindformer.py compatibility: added to sys.path and "
                             "REGISTER_PATH (this script imports the cogvlm2 plugin itself)")
    parser.add_argument("--max_new_tokens", default=None, type=int,
                        help="generate at most this many tokens (default: the config's)")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--output_format", default="text", choices=["text", "jsonl"],
                        help="stdout: answers as plain text (default) or one JSON object per answer "
                             "(unambiguous when answers contain newlines)")
    dataset = parser.add_argument_group("dataset mode (--predict_data data.jsonl, or a folder with --prompt)")
    dataset.add_argument("--output_file", default=None,
                         help="answers, one JSON line per input line, in input order (under msrun each rank "
                              "writes OUTPUT.rank<R>.jsonl and rank 0 merges them)")
    dataset.add_argument("--prompt", default=None, help="the question asked about every file of a media folder")
    dataset.add_argument("--overwrite", action="store_true",
                         help="start over instead of skipping the ids already in the output")
    dataset.add_argument("--merge_only", action="store_true",
                         help="only merge the rank files into --output_file (e.g. after a rank failed)")
    parser.add_argument("--verbose", action="store_true",
                        help="show MindSpore/mindformers logs and the traceback of errors")
    return parser.parse_args(argv)


def build_queries(predict_data, modal_type):
    """--predict_data + --modal_type -> queries [[{"video": path}, {"text": question}], ...]."""
    if modal_type is None:
        if len(predict_data) != 1:
            raise UsageError(f"--predict_data has {len(predict_data)} items: give --modal_type with one type "
                             "per item, e.g. --modal_type video text")
        modal_type = ["text"]
    if len(predict_data) != len(modal_type):
        raise UsageError(f"--predict_data has {len(predict_data)} items but --modal_type has {len(modal_type)}; "
                         "give one modal type per item, e.g. --predict_data video.mp4 \"Describe it.\" "
                         "--modal_type video text")
    queries, media = [], None
    for data, modal in zip(predict_data, modal_type):
        modal = modal.lower()
        if modal not in MODAL_TYPES:
            raise UsageError(f"unknown --modal_type {modal!r} (for {data!r}); use one of {', '.join(MODAL_TYPES)}")
        if modal == "text":
            queries.append(([media] if media else []) + [{"text": data}])
            media = None
            continue
        check_media_file(data, modal)
        if media is not None:
            raise UsageError(f"two media items in a row ({list(media.values())[0]!r} and {data!r}): each "
                             "video or image needs its question after it")
        media = {modal: data}
    if media is not None:
        raise UsageError(f"{list(media.values())[0]!r} has no question after it: add a text item, e.g. "
                         "--predict_data video.mp4 \"Describe this video.\" --modal_type video text")
    return queries


def check_media_file(path: str, modal: str):
    """A video/image item must be an existing file whose extension fits its modal type."""
    if not os.path.exists(path):
        raise UsageError(f"{modal} file not found: {path!r} (relative to {os.getcwd()})")
    if os.path.isdir(path):
        raise UsageError(f"{path!r} is a directory; give one {modal} file")
    extension = os.path.splitext(path)[1].lower()
    if extension not in MODAL_FILE_TYPES[modal]:
        other = next((m for m, exts in MODAL_FILE_TYPES.items() if extension in exts), None)
        hint = f"it looks like a {other} file: use --modal_type {other}" if other else \
            f"{modal} files end in {', '.join(MODAL_FILE_TYPES[modal])}"
        raise UsageError(f"{path!r} does not fit --modal_type {modal}: {hint}")


# ----- progress on stderr ------------------------------------------------------------------------
class Progress:
    """One stderr line per slow step: ``step ... result (1.2 s)``. On a terminal the elapsed time
    of the running step ticks."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.line_open = False

    def write(self, text: str):
        self.stream.write(text)
        self.stream.flush()
        if text:
            self.line_open = not text.endswith("\n")

    def rewrite(self, text: str):
        """Replace the current line (terminal only)."""
        newline = "\n" if text.endswith("\n") else ""
        self.write(f"\r{text.rstrip(chr(10))}\x1b[K{newline}")

    def end_line(self):
        if self.line_open:
            self.write("\n")

    @contextlib.contextmanager
    def step(self, text: str):
        """``with progress.step("loading weights") as result: ...; result.append("detail")``."""
        start, result, done = time.perf_counter(), [], threading.Event()
        self.write(f"{text} ...")
        ticker = None
        if self.live:
            def tick():
                while not done.wait(0.5):
                    self.rewrite(f"{text} ... {time.perf_counter() - start:.0f} s")
            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        failed = True
        try:
            yield result
            failed = False
        finally:
            done.set()
            if ticker is not None:
                ticker.join()
            if failed:
                result[:] = ["failed"]
            end = f"{' ' + ', '.join(result) if result else ''} ({time.perf_counter() - start:.1f} s)\n"
            if self.live:
                self.rewrite(f"{text} ...{end}")
            else:
                self.write(end)


# ----- the run -----------------------------------------------------------------------------------
def check_output_file(path: str):
    """Fail before loading anything if the result file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write the result file {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write the result file {path!r}: folder {folder!r} is read-only; set save_file "
                         "in the config or run from a writable directory")
    if os.path.isdir(path):
        raise UsageError(f"cannot write the result file {path!r}: it is a directory")


def submit_query(engine, query, max_new_tokens):
    """One [{"video"|"image": path}, {"text": q}] query -> an engine request handle."""
    media = {k: v for item in query for k, v in item.items() if k != "text"}
    text = "".join(item["text"] for item in query if "text" in item)
    options = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    return engine.submit(text, video=media.get("video"), image=media.get("image"), **options)


def describe(output) -> str:
    """'6 frames, 412 prompt tokens; generated 20 tokens in 1.4 s (first token after 1.2 s, then 130.7 tokens/s)'"""
    tokens = len(output.new_tokens)
    first = output.time_to_first_token or 0.0
    rate = (tokens - 1) / (output.seconds - first) if tokens > 1 and output.seconds > first else 0.0
    media = f"{output.frames} frames, " if output.frames else ""
    return (f"{media}{output.prompt_tokens} prompt tokens; generated {tokens} tokens in {output.seconds:.1f} s "
            f"(first token after {first:.1f} s, then {rate:.1f} tokens/s)")


def answer_record(index: int, query, output) -> dict:
    media = next((v for item in query for k, v in item.items() if k != "text"), None)
    return {"index": index, "question": "".join(item["text"] for item in query if "text" in item),
            "media": media, "answer": output.text, "prompt_tokens": output.prompt_tokens,
            "new_tokens": len(output.new_tokens), "frames": output.frames,
            "frame_indices": output.frame_indices, "finish_reason": output.finish_reason}


def is_dataset(predict_data) -> bool:
    """One ``.jsonl`` file or one folder: dataset mode."""
    return len(predict_data) == 1 and (predict_data[0].lower().endswith(".jsonl") or os.path.isdir(predict_data[0]))


def check_dataset_args(args):
    """The dataset flags fit together (checked before anything is imported or loaded)."""
    if not args.output_file:
        raise UsageError(f"--predict_data {args.predict_data[0]!r} is a dataset: give --output_file answers.jsonl")
    for flag, given in (("--modal_type", args.modal_type), ("--stream", args.stream),
                        ("--output_format", args.output_format != "text")):
        if given:
            raise UsageError(f"{flag} is for single questions; a dataset line says what it holds (\"videos\", "
                             "\"images\") and its answers go to --output_file")
    if os.path.isdir(args.output_file):
        raise UsageError(f"--output_file {args.output_file!r} is a directory; give a file name, e.g. answers.jsonl")
    if args.overwrite and args.merge_only:
        raise UsageError("--overwrite and --merge_only contradict each other: --merge_only keeps every answer")
    check_output_file(args.output_file)


def run(args, out, progress: Progress) -> int:
    if args.run_mode != "predict":
        raise UsageError(f"--run_mode {args.run_mode!r}: run_predict.py only predicts; use mindformers' "
                         "run_mindformer.py for train/finetune/eval")
    if args.predict_batch_size is not None and args.predict_batch_size < 1:
        raise UsageError(f"--predict_batch_size must be >= 1, got {args.predict_batch_size}")
    if not args.config and not args.load_checkpoint:
        raise UsageError("give --config YAML (e.g. configs/cogvlm2/predict_cogvlm2_video_tiny.yaml) or "
                         "--load_checkpoint DIR (a checkpoint directory with its config.json)")
    dataset = is_dataset(args.predict_data)
    if dataset:
        check_dataset_args(args)
        queries = None
    else:
        for flag, given in (("--output_file", args.output_file), ("--prompt", args.prompt),
                            ("--overwrite", args.overwrite), ("--merge_only", args.merge_only)):
            if given:
                raise UsageError(f"{flag} is for dataset mode: --predict_data must then be one .jsonl file "
                                 "(or a folder of media with --prompt)")
        queries = build_queries(args.predict_data, args.modal_type)
    if args.register_path:
        os.environ["REGISTER_PATH"] = os.path.realpath(args.register_path)
        if args.register_path not in sys.path:
            sys.path.append(args.register_path)

    import cogvlm2  # noqa: F401  registers the plugin with mindformers
    from cogvlm2.cogvlm2_cli import interrupt_on_signals
    engines = []                             # SIGINT/SIGTERM: cancel what the engine is doing, exit 130
    with interrupt_on_signals(on_signal=lambda: [engine.cancel_all() for engine in engines]) as stopped:
        if dataset:
            return answer_dataset(args, progress, engines)
        return answer_queries(args, queries, out, progress, engines, stopped)


def load_engine(args, yaml_config, batch_size, progress: Progress):
    """The engine from the YAML (with --load_checkpoint overriding its checkpoint), or from the
    checkpoint directory alone (its config.json) when no --config is given."""
    from cogvlm2 import CogVLM2Engine
    checkpoint = args.load_checkpoint or (yaml_config.load_checkpoint if yaml_config is not None else None)
    with progress.step(f"loading weights from {checkpoint}") as result:
        if yaml_config is not None:
            engine = CogVLM2Engine.from_config(args.config, load_checkpoint=args.load_checkpoint,
                                               device_target=args.device_target, device_id=args.device_id,
                                               max_batch_size=batch_size, adapter=args.adapter)
        else:
            set_device(args)
            overrides = {} if batch_size is None else {"max_batch_size": batch_size}
            engine = CogVLM2Engine.from_pretrained(args.load_checkpoint, adapter=args.adapter, **overrides)
        result.append(f"{sum(p.size for p in engine.model.get_parameters()) / 1e6:.1f}M parameters")
    return engine


def set_device(args, yaml_config=None):
    """GRAPH_MODE on --device_target (else the YAML's, else MindSpore's default device); MindSpore
    takes the device once per process."""
    import mindspore as ms
    if getattr(set_device, "done", False):
        return
    ms.set_context(mode=ms.GRAPH_MODE)
    target = args.device_target or (yaml_config.context.device_target if yaml_config is not None else None)
    wanted_id = args.device_id if args.device_id is not None else ms.get_context("device_id")
    if target and (target, wanted_id) != (ms.get_context("device_target"), ms.get_context("device_id")):
        ms.set_device(target, args.device_id)
    set_device.done = True


def answer_queries(args, queries, out, progress: Progress, engines: list, stopped) -> int:
    """Load the engine (appended to ``engines`` for the signal handler) and answer; ``stopped`` is set
    by SIGINT/SIGTERM."""
    from cogvlm2 import GenerationOptions
    from cogvlm2.cogvlm2_cli import write_atomically
    from cogvlm2.cogvlm2_loading import read_yaml
    from cogvlm2.cogvlm2_video_io import check_media_path
    for query in queries:
        for item in query:
            if "text" not in item:
                check_media_path(next(iter(item.values())))   # exists, not empty, not a text file
    if args.max_new_tokens is not None:
        GenerationOptions.from_kwargs(max_new_tokens=args.max_new_tokens)   # the family's message
    yaml_config = read_yaml(args.config) if args.config else None
    save_file = (yaml_config.save_file if yaml_config is not None else None) or f"{TASK}_result.txt"
    check_output_file(save_file)
    batch_size = args.predict_batch_size or int((yaml_config.predict_batch_size if yaml_config is not None
                                                 else None) or 1)
    engine = load_engine(args, yaml_config, batch_size, progress)
    engines.append(engine)

    def finished(handle):
        output = handle.result()
        if stopped.is_set():                 # the signal's KeyboardInterrupt may have been swallowed
            raise KeyboardInterrupt
        return output

    records = []
    with engine:
        try:
            if args.stream:        # one question at a time, its text as it comes
                for index, query in enumerate(queries):
                    handle = submit_query(engine, query, args.max_new_tokens)
                    if args.output_format == "text":
                        for piece in handle:
                            out.write(piece)
                            out.flush()
                        out.write("\n")
                    output = finished(handle)
                    progress.write(f"answer {index + 1}/{len(queries)}: {describe(output)}\n")
                    records.append(answer_record(index, query, output))
                    if args.output_format == "jsonl":
                        out.write(json.dumps(records[-1], ensure_ascii=False) + "\n")
                        out.flush()
            else:                  # all at once: the engine decodes up to batch_size together
                progress.write(f"generating {len(queries)} answer{'s' * (len(queries) > 1)} "
                               f"(batch size {batch_size}) ...\n")
                handles = [submit_query(engine, query, args.max_new_tokens) for query in queries]
                for index, (query, handle) in enumerate(zip(queries, handles)):
                    output = finished(handle)
                    progress.write(f"answer {index + 1}/{len(queries)}: {describe(output)}\n")
                    records.append(answer_record(index, query, output))
                    line = json.dumps(records[-1], ensure_ascii=False) if args.output_format == "jsonl" \
                        else output.text
                    out.write(line + "\n")
                    out.flush()
        except BaseException:
            engine.close(timeout=0)        # cancel what is in flight
            raise
    write_atomically(save_file, str([record["answer"] for record in records]), FILE_PERMISSION)
    progress.write(f"result saved to {save_file}\n")
    return 0


def stderr_copy():
    """A stream on a copy of fd 2: what is written to it is not caught while the video reader
    captures fd 2 for ffmpeg's messages (in the engine's preprocessing threads)."""
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", encoding="utf-8", errors="replace", buffering=1)
    except (AttributeError, OSError, ValueError):     # not a real file, e.g. captured by pytest
        return None


def answer_dataset(args, progress: Progress, engines: list) -> int:
    """Dataset mode: the samples are read and checked, then (under msrun) this rank's shard is
    answered into its file and rank 0 merges; --merge_only only merges."""
    stream = stderr_copy()
    try:
        return answer_dataset_to(args, Progress(stream) if stream else progress, stream, engines)
    finally:
        if stream is not None:
            stream.close()


def answer_dataset_to(args, progress: Progress, stream, engines: list) -> int:
    from cogvlm2 import cogvlm2_dataset as ds
    from cogvlm2.cogvlm2_loading import read_yaml
    role = ds.msrun_role()
    yaml_config = read_yaml(args.config) if args.config else None
    if role == "MS_SCHED":                        # msrun's scheduler process: serve the cluster, no work
        set_device(args, yaml_config)
        ds.join_msrun_cluster()
        return 0
    options = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    samples = ds.read_dataset(args.predict_data[0], args.prompt, **options)
    if args.max_new_tokens is not None:           # the flag is the default; a line's own value wins
        for sample in samples:
            sample.options.setdefault("max_new_tokens", args.max_new_tokens)
    rank, size = 0, 1
    if role is not None:
        set_device(args, yaml_config)
        rank, size = ds.join_msrun_cluster()
        import mindspore as ms
        args.device_id = ms.get_context("device_id")   # msrun's (DEVICE_ID), not the YAML's: set once
    if args.merge_only:
        if rank == 0:
            written, missing = ds.merge_answers(samples, args.output_file)
            progress.write(f"{written} of {len(samples)} answers in input order in {args.output_file}" +
                           (f"; {len(missing)} missing (ids {missing[:5]}{'...' * (len(missing) > 5)}): rerun the "
                            "same command without --merge_only to answer them\n" if missing else "\n"))
        return 0
    progress.write(f"{len(samples)} samples in {args.predict_data[0]}" +
                   (f"; rank {rank} of {size} takes {len(ds.shard(samples, rank, size))}\n" if size > 1 else "\n"))
    engine = load_engine(args, yaml_config, args.predict_batch_size, progress)
    engines.append(engine)                        # a signal cancels its requests (none is written)
    with engine:
        try:
            ds.run_dataset(engine, samples, args.output_file, rank, size, overwrite=args.overwrite,
                           log=lambda text: progress.write(text + "\n"), stream=stream)
        except KeyboardInterrupt:
            engine.close(timeout=0)
            progress.end_line()
            progress.write("interrupted: the answers written so far are kept; rerun the same command to "
                           "resume\n")
            return 130
        except BaseException:
            engine.close(timeout=0)
            raise
    return 0


@contextlib.contextmanager
def answer_stream(verbose: bool):
    """Yield the stream the answer is written to. Meanwhile whatever the libraries print to stdout
    (mindformers' logger from Python, MindSpore's C++ code at file descriptor 1) goes to stderr with
    --verbose and nowhere without, so stdout carries only the answer."""
    sink = sys.stderr if verbose else open(os.devnull, "w", encoding="utf-8")
    saved = sys.stdout
    try:
        fd = saved.fileno()
    except (AttributeError, OSError, ValueError):   # not a real file, e.g. captured by pytest
        fd = None
    try:
        if fd is None:
            sys.stdout = sink
            yield saved
            return
        saved.flush()
        sink.flush()
        kept = os.dup(fd)
        os.dup2(sink.fileno(), fd)
        answer = os.fdopen(kept, "w", encoding=getattr(saved, "encoding", None) or "utf-8",
                           errors="replace", buffering=1)
        sys.stdout = sink
        try:
            yield answer
        finally:
            answer.flush()
            os.dup2(kept, fd)
            answer.close()
    finally:
        sys.stdout = saved
        if sink is not sys.stderr:
            sink.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("GLOG_v", "3")   # MindSpore's C++ log level, read when it is imported
    progress = Progress()
    with answer_stream(args.verbose) as out:
        try:
            return run(args, out, progress)
        except KeyboardInterrupt:
            progress.end_line()
            progress.write("interrupted (no result file written)\n")
            return 130
        except Exception as err:  # pylint: disable=broad-except
            if args.verbose:
                raise
            if isinstance(err, UsageError):      # found before the plugin (and MindSpore) is imported
                known, message = True, str(err)
            else:
                from cogvlm2.cogvlm2_cli import is_user_error, one_line
                known, message = is_user_error(err), one_line(err)
            hint = "" if known else f" ({type(err).__name__}; run with --verbose for the traceback)"
            progress.end_line()
            progress.write(f"error: {message}{hint}\n")
            return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
