"""Answer a question about a video with CogVLM2-Video, configured by a mindformers YAML file.

    python run_predict.py --config configs/cogvlm2/predict_cogvlm2_video_tiny.yaml \\
        --predict_data tests/fixtures/bigbuckbunny.mp4 "Please describe this video." --modal_type video text

The flags are those of mindformers' run_mindformer.py in predict mode (that script is not in the
mindformers wheel), plus --max_new_tokens, --stream and --verbose. The answer goes to stdout (and,
as mindformers does, into the result file: ``save_file`` of the config or
./multi_modal_to_text_generation_result.txt); progress goes to stderr.

--predict_data / --modal_type pair up item by item. Each query is an optional video (or image)
followed by its question, so ``a.mp4 "Q1" b.mp4 "Q2" --modal_type video text video text`` asks two
questions, answered in batches of --predict_batch_size.
"""
import argparse
import copy
import contextlib
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
    """A bad flag, input file, config or checkpoint, reported as one line (exit code 2)."""


# ----- command line ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python run_predict.py --config configs/cogvlm2/predict_cogvlm2_video_tiny.yaml "
               "--predict_data tests/fixtures/bigbuckbunny.mp4 \"Please describe this video.\" "
               "--modal_type video text")
    parser.add_argument("--config", required=True, help="YAML config (configs/cogvlm2/predict_*.yaml)")
    parser.add_argument("--run_mode", default="predict", help="only 'predict' (the default)")
    parser.add_argument("--predict_data", nargs="+", required=True,
                        help="video/image paths and questions, e.g. video.mp4 \"Describe this video.\"")
    parser.add_argument("--modal_type", nargs="+", default=None,
                        help="the type of each --predict_data item: video, image or text "
                             "(default: text for a single item)")
    parser.add_argument("--load_checkpoint", default=None,
                        help="checkpoint directory: a HF download (config.json + model.safetensors.index.json "
                             "+ shards) or the output of tools/convert_weight.py (default: the config's)")
    parser.add_argument("--device_target", default=None, choices=["CPU", "Ascend", "GPU"],
                        help="overrides context.device_target")
    parser.add_argument("--device_id", default=None, type=int, help="overrides context.device_id")
    parser.add_argument("--predict_batch_size", default=None, type=int,
                        help="questions answered together (default: the config's, else 1)")
    parser.add_argument("--register_path", default=None,
                        help="accepted for run_mindformer.py compatibility: added to sys.path and "
                             "REGISTER_PATH (this script imports the cogvlm2 plugin itself)")
    parser.add_argument("--max_new_tokens", default=None, type=int,
                        help="generate at most this many tokens (default: the config's)")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
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


def load_config(args):
    """The YAML config with the command line's overrides, as run_mindformer.py applies them."""
    if not os.path.isfile(args.config):
        raise UsageError(f"config file not found: {args.config!r}; use e.g. "
                         "configs/cogvlm2/predict_cogvlm2_video_tiny.yaml")
    from mindformers.tools.register import MindFormerConfig
    try:
        config = MindFormerConfig(os.path.realpath(args.config))
    except Exception as err:  # yaml.YAMLError and friends
        raise UsageError(f"cannot read config {args.config!r}: {one_line(err)}") from err
    if not config.model or not config.model.model_config or not config.processor:
        raise UsageError(f"{args.config!r} has no model.model_config or processor section: "
                         "is it a CogVLM2 predict config?")
    if args.device_target is not None:
        config.context.device_target = args.device_target
    if args.device_id is not None:
        config.context.device_id = args.device_id
    if args.load_checkpoint is not None:
        config.load_checkpoint = args.load_checkpoint
    if args.predict_batch_size is not None:
        config.predict_batch_size = args.predict_batch_size
    if args.max_new_tokens is not None:
        config.model.model_config.max_new_tokens = args.max_new_tokens
    if not config.load_checkpoint:
        raise UsageError(f"no checkpoint: {args.config!r} sets no load_checkpoint; pass --load_checkpoint DIR "
                         "(a HF download of THUDM/cogvlm2-video-llama3-chat or a tools/convert_weight.py output)")
    # run_mindformer.py needs these to import the plugin; this script has imported it already.
    config.processor.pop("auto_register", None)
    if config.processor.tokenizer:
        config.processor.tokenizer.pop("auto_register", None)
    return config


def check_checkpoint(directory: str, config_path: str, model_config):
    """Fail before building the model if ``directory`` is missing, not a CogVLM2 checkpoint, or
    holds a model of other sizes than the config."""
    from cogvlm2.cogvlm2_config import CogVLM2Config
    from cogvlm2.cogvlm2_weights import CheckpointError, checkpoint_files
    if not os.path.exists(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory!r} (relative to {os.getcwd()}); "
                              "pass --load_checkpoint DIR")
    checkpoint_files(directory)      # a CheckpointError unless it holds an index or model.safetensors
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return                       # nothing more to compare; loading checks every tensor
    from mindformers.models.build_config import build_model_config
    saved = CogVLM2Config.from_hf_config(directory).to_hf_dict()
    wanted = build_model_config(copy.deepcopy(model_config)).to_hf_dict()   # YAML spellings resolved
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_multi_query_heads")
    vision_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_heads")
    differ = [f"{k} {saved[k]} vs {wanted[k]}" for k in keys if saved[k] != wanted[k]]
    differ += [f"vision {k} {saved['vision_config'][k]} vs {wanted['vision_config'][k]}" for k in vision_keys
               if saved["vision_config"][k] != wanted["vision_config"][k]]
    if differ:
        raise CheckpointError(f"{directory}: the checkpoint does not fit {config_path} (checkpoint vs config: "
                              f"{'; '.join(differ)}); use the config made for this checkpoint")


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


class TokenReporter:
    """``on_tokens`` callback of generate: counts tokens, prints tokens/s on a terminal, and with
    ``stream_to`` writes the text of a single sample as it arrives."""

    def __init__(self, progress: Progress, tokenizer, stop_ids, stream_to=None):
        from cogvlm2.cogvlm2_tokenizer import StreamDecoder
        self.progress = progress
        self.stop_ids = set(int(i) for i in stop_ids)
        self.stream_to = stream_to
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True) if stream_to else None
        self.steps = 0
        self.stopped = False
        self.start = time.perf_counter()
        self.first = None

    def __call__(self, tokens):
        now = time.perf_counter()
        self.first = self.first or now
        self.steps += 1
        if self.decoder is not None and not self.stopped:
            token = int(tokens[0])
            if token in self.stop_ids:
                self.stopped = True
            else:
                self.stream_to.write(self.decoder.push([token]))
                self.stream_to.flush()
        elif self.progress.live and self.steps > 1:
            rate = (self.steps - 1) / max(now - self.first, 1e-9)
            self.progress.rewrite(f"generating ... {self.steps} tokens, {rate:.1f} tokens/s")

    def finish(self, output) -> str:
        if self.decoder is not None:
            self.stream_to.write(self.decoder.flush() + "\n")
            self.stream_to.flush()
        tokens = max(len(t) for t in output.new_tokens)
        return (f"{tokens} tokens in {output.prefill_seconds + output.decode_seconds:.1f} s (prompt "
                f"{output.prefill_seconds:.1f} s, then {output.decode_tokens_per_second:.1f} tokens/s)")


# ----- the run -----------------------------------------------------------------------------------
def run(args, out, progress: Progress) -> int:
    if args.run_mode != "predict":
        raise UsageError(f"--run_mode {args.run_mode!r}: run_predict.py only predicts; use mindformers' "
                         "run_mindformer.py for train/finetune/eval")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.predict_batch_size is not None and args.predict_batch_size < 1:
        raise UsageError(f"--predict_batch_size must be >= 1, got {args.predict_batch_size}")
    queries = build_queries(args.predict_data, args.modal_type)
    if args.register_path:
        os.environ["REGISTER_PATH"] = os.path.realpath(args.register_path)
        if args.register_path not in sys.path:
            sys.path.append(args.register_path)

    import cogvlm2  # noqa: F401  registers the plugin with mindformers
    from cogvlm2.cogvlm2_video_io import check_media_path
    for query in queries:
        for item in query:
            if "text" not in item:
                check_media_path(next(iter(item.values())))   # exists, not empty, not a text file
    config = load_config(args)
    check_checkpoint(config.load_checkpoint, args.config, config.model.model_config)

    from mindspore.nn.utils import no_init_parameters
    from mindformers.core.context import build_context
    from mindformers.models.build_model import build_network
    from mindformers.models.build_processor import build_processor
    from mindformers.utils.file_utils import set_output_path
    from cogvlm2.cogvlm2_mindformers import check_parameters_loaded, generation_defaults, model_inputs

    set_output_path(config.output_dir)
    build_context(config)
    with progress.step("building tokenizer and processor"):
        processor = build_processor(config.processor)
    with progress.step(f"loading weights from {config.load_checkpoint}") as result:
        with no_init_parameters():
            model = build_network(config.model)
        model.load_weights(config.load_checkpoint)
        check_parameters_loaded(model)
        result.append(f"{sum(p.size for p in model.get_parameters()) / 1e6:.1f}M parameters")
    options = generation_defaults(model.config)
    stop_ids = model.config.stop_token_ids

    batch_size = int(config.predict_batch_size or 1)
    stream = args.stream and batch_size == 1
    if args.stream and not stream:
        progress.write("note: --stream needs --predict_batch_size 1; answers are printed when complete\n")
    answers = []
    for begin in range(0, len(queries), batch_size):
        batch = queries[begin:begin + batch_size]
        has_media = any(len(query) > 1 for query in batch)
        with progress.step("reading frames" if has_media else "tokenizing") as result:
            inputs = processor(query_list=batch if len(batch) > 1 else batch[0])
            frames = 0 if inputs.get("pixel_values") is None else len(inputs["pixel_values"])
            tokens = f"{inputs['input_ids'].shape[1]} prompt tokens"
            result.append(f"{frames} frames, {tokens}" if has_media else tokens)
        inputs = model_inputs(inputs)
        pixels = inputs.pop("pixel_values", None)
        if pixels is not None:
            with progress.step("encoding frames (vision tower)") as result:
                inputs["vision_embeds"] = model.encode_video(pixels)
                result.append(f"{frames} frames")
        reporter = TokenReporter(progress, processor.tokenizer, stop_ids, out if stream else None)
        if not stream:
            progress.write("generating ...")
        output = model.generate(**inputs, on_tokens=reporter, **options)
        summary = reporter.finish(output)
        if stream:
            progress.write(f"generated {summary}\n")
        elif progress.live:
            progress.rewrite(f"generating ... {summary}\n")
        else:
            progress.write(f" {summary}\n")
        texts = processor.post_process(output.new_tokens)
        if not stream:
            for text in texts:
                out.write(text + "\n")
            out.flush()
        answers.extend(texts)

    save_file = config.save_file or f"{TASK}_result.txt"
    with os.fdopen(os.open(save_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_PERMISSION), "w") as f:
        f.write(str(answers))
    progress.write(f"result saved to {save_file}\n")
    return 0


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


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
            progress.write("interrupted\n")
            return 130
        except Exception as err:  # pylint: disable=broad-except
            if args.verbose:
                raise
            known = is_user_error(err)
            hint = "" if known else f" ({type(err).__name__}; run with --verbose for the traceback)"
            progress.end_line()
            progress.write(f"error: {one_line(err)}{hint}\n")
            return 2 if known else 1


def is_user_error(err: BaseException) -> bool:
    """Errors about the inputs, config or checkpoint, whose message says what to fix."""
    if isinstance(err, UsageError):
        return True
    from cogvlm2.cogvlm2_config import CogVLM2ConfigError
    from cogvlm2.cogvlm2_errors import CogVLM2InputError
    from cogvlm2.cogvlm2_generation import ContextLengthError
    from cogvlm2.cogvlm2_weights import CheckpointError
    return isinstance(err, (CogVLM2ConfigError, CogVLM2InputError, ContextLengthError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
