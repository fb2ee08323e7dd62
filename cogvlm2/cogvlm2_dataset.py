"""Dataset-scale inference: answer every line of a JSONL file (or every video of a folder) with one
loaded engine, resumable, on one process or on the ranks of an ``msrun`` job.

Input (the ms-swift format), one JSON object a line; relative media paths resolve against the
JSONL's folder; ``id`` defaults to the line number::

    {"id": "clip-1", "query": "Describe this video.", "videos": ["clips/1.mp4"], "max_new_tokens": 64}
    {"query": "What is in the picture?", "images": ["cat.jpg"]}
    {"query": "And then?", "videos": ["clips/1.mp4"], "history": [["What animal?", "A rabbit."]]}

Output, one JSON line per input line: ``{"id", "answer", "prompt_tokens", "new_tokens", "frames",
"frame_indices", "seconds", "finish_reason"}`` or ``{"id", "error"}`` for a sample that failed
(a corrupt or missing video, a prompt too long): the failure is recorded and the run goes on.

- ``read_dataset``: the samples, every line checked (JSON, keys, options, duplicate ids) before any work.
- ``shard``: rank r of n takes samples r, r+n, r+2n, ... (disjoint, deterministic, balanced).
- ``AnswerWriter``: appends one whole line per sample with a single ``write`` and flushes it, so a
  crash or Ctrl-C loses at most the samples in flight; a torn last line (power loss) is cut off when
  the file is opened again.
- ``answer_shard``: feeds the engine through a bounded window (frames are decoded ahead of the model
  by the engine's preprocessing threads without queueing thousands of videos in memory), writes each
  answer as it finishes and shows a tqdm bar on stderr.
- ``merge_answers``: the output file in input order from the rank files (and an earlier output).

Resume: ids already in the output file or in any rank file ``<output>.rank<R>.jsonl`` are skipped,
so a rerun (even with another number of ranks) does only what is left.
"""
import collections
import dataclasses
import glob
import json
import os
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

from cogvlm2.cogvlm2_cli import one_line, write_atomically
from cogvlm2.cogvlm2_errors import CogVLM2Error, CogVLM2InputError
from cogvlm2.cogvlm2_generation import GenerationOptions
from cogvlm2.cogvlm2_video_io import IMAGE_EXTENSIONS

__all__ = ["Sample", "read_dataset", "read_jsonl", "read_media_folder", "shard", "rank_file", "AnswerWriter",
           "read_answers", "answered_ids", "answer_shard", "merge_answers", "ShardReport", "VIDEO_EXTENSIONS"]

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".flv", ".mpg", ".mpeg", ".ts",
                              ".wmv"})
# generation options a line may set (the engine's per-request options)
LINE_OPTIONS = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p",
                "repetition_penalty", "seed", "stop_token_ids")
LINE_KEYS = ("id", "query", "videos", "images", "history", "response") + LINE_OPTIONS   # response: ignored


@dataclasses.dataclass
class Sample:
    """One question of the dataset."""
    index: int                       # position in the input (0-based): the output's order
    id: object                       # str or int, as given (default: the line number)
    query: str
    video: Optional[str] = None      # absolute path
    image: Optional[str] = None
    history: List[List[str]] = dataclasses.field(default_factory=list)
    options: Dict[str, object] = dataclasses.field(default_factory=dict)
    where: str = ""                  # "data.jsonl line 7", for messages


def id_key(sample_id) -> str:
    """Ids compare as JSON values: 3 and "3" are different ids."""
    return json.dumps(sample_id, ensure_ascii=False)


# ----- reading the input -------------------------------------------------------------------------
def read_dataset(path: str, prompt: Optional[str] = None, **options) -> List[Sample]:
    """The samples of a ``.jsonl`` file, or of a folder of videos/images asked ``prompt``."""
    if os.path.isdir(path):
        if not prompt:
            raise CogVLM2InputError(f"{path!r} is a folder of media: give the question for every file with "
                                    "--prompt \"Describe this video.\"")
        return read_media_folder(path, prompt, **options)
    if prompt:
        raise CogVLM2InputError(f"--prompt is for a folder of media; the lines of {path!r} carry their own "
                                "\"query\"")
    return read_jsonl(path)


def read_jsonl(path: str) -> List[Sample]:
    """Every line parsed and checked; the first bad line raises CogVLM2InputError naming it."""
    if not os.path.isfile(path):
        raise CogVLM2InputError(f"dataset file not found: {path!r} (relative to {os.getcwd()})")
    folder = os.path.dirname(os.path.abspath(path))
    samples, seen = [], {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as err:
        raise CogVLM2InputError(f"{path!r} is not UTF-8 text ({err.reason} at byte {err.start}); a dataset "
                                "is a JSONL file: one JSON object a line") from err
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        try:
            line = json.loads(text)
        except json.JSONDecodeError as err:
            raise CogVLM2InputError(f"{where} is not valid JSON ({err.msg}, column {err.colno}); a dataset line "
                                    "is one object like {\"query\": \"Describe this video.\", \"videos\": "
                                    "[\"a.mp4\"]}") from err
        sample = _sample(line, number, len(samples), folder, where)
        key = id_key(sample.id)
        if key in seen:
            raise CogVLM2InputError(f"{where}: id {sample.id!r} is already the id of line {seen[key]}; ids must "
                                    "be unique (a line without \"id\" has its line number as id)")
        seen[key] = number
        samples.append(sample)
    if not samples:
        raise CogVLM2InputError(f"dataset {path!r} has no lines")
    return samples


def _sample(line, number: int, index: int, folder: str, where: str) -> Sample:
    if not isinstance(line, dict):
        raise CogVLM2InputError(f"{where} is a JSON {type(line).__name__}, not an object with \"query\"")
    unknown = sorted(set(line) - set(LINE_KEYS))
    if unknown:
        raise CogVLM2InputError(f"{where}: unknown key(s) {unknown}; a line has {', '.join(LINE_KEYS)}")
    sample_id = line.get("id", number)
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise CogVLM2InputError(f"{where}: id must be a string or an integer, got {sample_id!r}")
    query = line.get("query")
    if not isinstance(query, str):
        raise CogVLM2InputError(f"{where}: \"query\" must be the question as a string, got {query!r}")
    media = {}
    for key in ("videos", "images"):
        value = line.get(key)
        if value in (None, []):
            continue
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or len(paths) != 1 or not isinstance(paths[0], str) or not paths[0]:
            raise CogVLM2InputError(f"{where}: \"{key}\" must be a list of one path (the model takes one "
                                    f"{key[:-1]} per question), got {value!r}")
        media[key] = os.path.join(folder, os.path.expanduser(paths[0]))
    if len(media) > 1:
        raise CogVLM2InputError(f"{where}: give \"videos\" or \"images\", not both")
    history = line.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in history):
        raise CogVLM2InputError(f"{where}: \"history\" must be a list of [question, answer] string pairs, "
                                f"got {history!r}")
    options = {key: line[key] for key in LINE_OPTIONS if key in line}
    try:
        GenerationOptions.from_kwargs(**options)
    except CogVLM2Error as err:
        raise type(err)(f"{where}: {err}") from err
    return Sample(index, sample_id, query, media.get("videos"), media.get("images"),
                  [list(turn) for turn in history], options, where)


def read_media_folder(folder: str, prompt: str, **options) -> List[Sample]:
    """Every video and image under ``folder`` (sorted, recursively), each asked ``prompt``; the id is
    the path relative to the folder."""
    GenerationOptions.from_kwargs(**options)
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS:
                paths.append(os.path.join(root, name))
    if not paths:
        raise CogVLM2InputError(f"folder {folder!r} has no videos or images (looked for "
                                f"{', '.join(sorted(VIDEO_EXTENSIONS | IMAGE_EXTENSIONS))})")
    samples = []
    for index, path in enumerate(paths):
        is_image = os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
        sample_id = os.path.relpath(path, folder).replace(os.sep, "/")
        samples.append(Sample(index, sample_id, prompt, None if is_image else os.path.abspath(path),
                              os.path.abspath(path) if is_image else None, [], dict(options),
                              f"{folder}: {sample_id}"))
    return samples


def shard(samples: Sequence[Sample], rank: int, size: int) -> List[Sample]:
    """Rank ``rank`` of ``size`` takes every size-th sample from its rank on: disjoint, the same on
    every run, and each rank gets the same mix of long and short samples."""
    return list(samples[rank::size])


# ----- answer files ------------------------------------------------------------------------------
def rank_file(output_file: str, rank: int) -> str:
    """answers.jsonl -> answers.rank3.jsonl"""
    stem = output_file[:-len(".jsonl")] if output_file.endswith(".jsonl") else output_file
    return f"{stem}.rank{rank}.jsonl"


def read_answers(path: str, repair: bool = False) -> List[dict]:
    """The records of an answer file. An unterminated last line (a torn write) is cut off the file
    when ``repair`` (the file's own writer opens it), else ignored (another rank is writing it)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
            print(f"{path}: removed a torn last line ({len(data) - end} bytes) left by an interrupted write",
                  file=sys.stderr)
        data = data[:end]
    records = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CogVLM2InputError(f"{path} line {number} is not a JSON answer ({err.msg}): was the file edited? "
                                    "Fix or delete that line, or start over with --overwrite") from err
        if not isinstance(record, dict) or "id" not in record or not ("answer" in record or "error" in record):
            raise CogVLM2InputError(f"{path} line {number} is not an answer record ({{\"id\", \"answer\" or "
                                    "\"error\"}}): is this the output of another job? Use another --output_file or "
                                    "--overwrite")
        records.append(record)
    return records


def answer_files(output_file: str) -> List[str]:
    """The output file and every rank file beside it, existing ones only."""
    pattern = rank_file(output_file, 0)[:-len("0.jsonl")]
    ranks = sorted((p for p in glob.glob(glob.escape(pattern) + "*.jsonl") if p[len(pattern):-6].isdigit()),
                   key=lambda p: int(p[len(pattern):-6]))
    return [path for path in [output_file] + ranks if os.path.exists(path)]


def answered_ids(samples: Sequence[Sample], output_file: str, own_file: Optional[str] = None) -> set:
    """Keys of the ids already answered in the output file or any rank file; an id that is not in
    the input means the files belong to another dataset (an error, before any work)."""
    known = {id_key(s.id) for s in samples}
    done = set()
    for path in answer_files(output_file):
        for record in read_answers(path, repair=path == own_file):
            key = id_key(record["id"])
            if key not in known:
                raise CogVLM2InputError(f"{path} has an answer for id {record['id']!r}, which is not in the dataset: "
                                        "is it the output of another dataset? Use another --output_file, or "
                                        "--overwrite to start over")
            done.add(key)
    return done


class AnswerWriter:
    """Appends answer records to a JSONL file: each line is written whole with one ``write`` call on
    an O_APPEND descriptor, so readers and crashes never see half a line of a finished write."""

    def __init__(self, path: str):
        read_answers(path, repair=True)              # cut a torn tail before appending after it
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict):
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge_answers(samples: Sequence[Sample], output_file: str, sources: Optional[Iterable[str]] = None):
    """Write ``output_file`` (atomically) with one record per sample that has one, in input order,
    from ``sources`` (default: the output file and every rank file). Rank files are deleted when
    every sample is answered. Returns (records written, ids still missing)."""
    sources = answer_files(output_file) if sources is None else [p for p in sources if os.path.exists(p)]
    records = {}
    for path in sources:
        for record in read_answers(path):
            records.setdefault(id_key(record["id"]), record)
    ordered = [records[id_key(s.id)] for s in samples if id_key(s.id) in records]
    missing = [s.id for s in samples if id_key(s.id) not in records]
    write_atomically(output_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered), 0o644)
    if not missing:
        for path in sources:
            if path != output_file:
                os.unlink(path)
    return len(ordered), missing


# ----- answering -------------------------------------------------------------------------------
@dataclasses.dataclass
class ShardReport:
    """What one rank did in this run."""
    total: int = 0                 # samples of the shard
    skipped: int = 0               # answered by an earlier run
    answered: int = 0
    failed: int = 0
    videos: int = 0                # finished samples with a video
    new_tokens: int = 0
    seconds: float = 0.0
    model_idle_seconds: float = 0.0   # the model thread waited for frames (engine's input_wait_seconds)

    @property
    def done(self) -> int:
        return self.answered + self.failed

    def summary(self) -> str:
        minutes = self.seconds / 60 or float("nan")
        idle = self.model_idle_seconds / self.seconds if self.seconds else 0.0
        return (f"{self.done} samples in {self.seconds:.1f} s ({self.answered} answered, {self.failed} failed, "
                f"{self.skipped} already done): {self.videos / minutes:.1f} videos/min, "
                f"{self.new_tokens / max(self.seconds, 1e-9):.1f} new tokens/s; "
                f"model idle waiting for frames {100 * idle:.1f}% of the run")


def answer_record(sample: Sample, output) -> dict:
    return {"id": sample.id, "answer": output.text, "prompt_tokens": output.prompt_tokens,
            "new_tokens": len(output.new_tokens), "frames": output.frames, "frame_indices": output.frame_indices,
            "seconds": round(output.seconds, 3), "finish_reason": output.finish_reason}


def answer_shard(engine, samples: Sequence[Sample], writer: AnswerWriter, done: set, window: Optional[int] = None,
                 progress: bool = True, desc: Optional[str] = None, poll_seconds: float = 0.005,
                 stream=None) -> ShardReport:
    """Answer the samples not in ``done`` (id keys), at most ``window`` (default 3 x the engine's
    batch size) in the engine at once, writing each record as it finishes. The progress bar goes to
    ``stream`` (default stderr; give a stream on a copy of fd 2: while frames are decoded, fd 2 is
    captured for ffmpeg's messages)."""
    from tqdm import tqdm
    todo = collections.deque(s for s in samples if id_key(s.id) not in done)
    report = ShardReport(total=len(samples), skipped=len(samples) - len(todo))
    window = window or 3 * engine.max_batch_size
    start, idle_before = time.perf_counter(), engine.snapshot().input_wait_seconds
    stream = stream or sys.stderr
    live = hasattr(stream, "isatty") and stream.isatty()
    bar = tqdm(total=report.total, initial=report.skipped, desc=desc or "samples", unit="sample", file=stream,
               dynamic_ncols=True, mininterval=0.5 if live else 30, disable=not progress)
    in_flight: "collections.OrderedDict[object, Sample]" = collections.OrderedDict()

    def record(sample: Sample, result: dict):
        writer.write(result)
        report.videos += sample.video is not None
        if "error" in result:
            report.failed += 1
        else:
            report.answered += 1
            report.new_tokens += result["new_tokens"]
        minutes = (time.perf_counter() - start) / 60
        bar.set_postfix_str(f"{report.videos / minutes:.1f} videos/min, {report.new_tokens / minutes / 60:.1f} tok/s, "
                            f"{report.failed} failed", refresh=False)
        bar.update(1)

    try:
        while todo or in_flight:
            while todo and len(in_flight) < window:
                sample = todo.popleft()
                try:
                    handle = engine.submit(sample.query, video=sample.video, image=sample.image,
                                           history=sample.history, request_id=str(sample.id), **sample.options)
                except (CogVLM2Error, OSError) as err:          # a missing or unreadable file
                    record(sample, {"id": sample.id, "error": one_line(err)})
                    continue
                in_flight[handle] = sample
            finished = [handle for handle in in_flight if handle.done()]
            if not finished:
                time.sleep(poll_seconds)
                continue
            for handle in finished:
                sample = in_flight.pop(handle)
                try:
                    output = handle.result()
                except (CogVLM2Error, OSError) as err:          # a corrupt video, a prompt too long
                    result = {"id": sample.id, "error": one_line(err)}
                else:
                    if output.finish_reason == "cancelled":     # Ctrl-C / SIGTERM: never written as an answer
                        raise KeyboardInterrupt(f"request {sample.id!r} cancelled")
                    result = answer_record(sample, output)
                record(sample, result)
    finally:
        for handle in in_flight:
            handle.cancel()
        bar.close()
        report.seconds = time.perf_counter() - start
        report.model_idle_seconds = engine.snapshot().input_wait_seconds - idle_before
    return report


# ----- the job: one process or the ranks of msrun ------------------------------------------------
def msrun_role() -> Optional[str]:
    """"MS_WORKER" / "MS_SCHED" when started by msrun, else None."""
    return os.environ.get("MS_ROLE") or None


def join_msrun_cluster():
    """(rank, size) of this msrun worker after ``mindspore.communication.init()``. msrun also runs the
    script as the scheduler: there ``init()`` serves the cluster until the workers are done."""
    from mindspore.communication import get_group_size, get_rank, init
    init()
    return get_rank(), get_group_size()


def done_marker(output_file: str, rank: int) -> str:
    return rank_file(output_file, rank)[:-len(".jsonl")] + ".done"


def wait_for_ranks(samples: Sequence[Sample], output_file: str, size: int, poll_seconds: float = 2.0,
                   log=None):
    """Rank 0's barrier: wait until every rank wrote its done marker and the answer files cover every
    sample. Files, not a collective: shards finish minutes or hours apart and MindSpore's CPU
    AllReduce gives up after a minute; the folder must be shared between machines anyway, for the merge."""
    markers = [done_marker(output_file, rank) for rank in range(size)]
    told = False
    while True:
        waiting = [rank for rank, marker in enumerate(markers) if not os.path.exists(marker)]
        if not waiting and len(answered_ids(samples, output_file)) == len(samples):
            return
        if not told and log is not None:
            log(f"waiting for rank(s) {waiting or 'writing'} to finish before merging ...")
            told = True
        time.sleep(poll_seconds)


def clear_outputs(output_file: str, rank: int, size: int):
    """--overwrite: each rank removes its own rank file and marker; rank 0 also the output file and
    the files of ranks that this run does not have."""
    mine = [rank_file(output_file, rank), done_marker(output_file, rank)]
    if rank == 0:
        mine.append(output_file)
        for path in answer_files(output_file):
            number = path[len(rank_file(output_file, 0)) - len("0.jsonl"):-len(".jsonl")]
            if path != output_file and int(number) >= size:
                mine += [path, done_marker(output_file, int(number))]
    for path in mine:
        if os.path.exists(path):
            os.unlink(path)


def run_dataset(engine, samples: Sequence[Sample], output_file: str, rank: int = 0, size: int = 1,
                window: Optional[int] = None, overwrite: bool = False, progress: bool = True,
                log=None, stream=None) -> ShardReport:
    """Answer this rank's shard into its file (the output file itself for one process), then, on rank 0,
    wait for the others and write the output file in input order."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    if overwrite:
        clear_outputs(output_file, rank, size)
    own = output_file if size == 1 else rank_file(output_file, rank)
    if size > 1 and os.path.exists(done_marker(output_file, rank)):
        os.unlink(done_marker(output_file, rank))
    done = set() if overwrite else answered_ids(samples, output_file, own_file=own)
    part = shard(samples, rank, size)
    desc = f"rank {rank}/{size}" if size > 1 else "samples"
    with AnswerWriter(own) as writer:
        report = answer_shard(engine, part, writer, done, window=window, progress=progress, desc=desc,
                              stream=stream)
    log(("" if size == 1 else f"rank {rank}: ") + report.summary())
    if size > 1:
        write_atomically(done_marker(output_file, rank), json.dumps(dataclasses.asdict(report)) + "\n", 0o644)
        if rank != 0:
            return report
        wait_for_ranks(samples, output_file, size, log=log)
        for marker in (done_marker(output_file, r) for r in range(size)):
            if os.path.exists(marker):
                os.unlink(marker)
    written, missing = merge_answers(samples, output_file)
    if missing:                                  # cannot happen after a complete shard; say so if it does
        raise CogVLM2InputError(f"{output_file}: {len(missing)} samples have no answer (ids {missing[:5]}...)")
    log(f"{written} answers in input order in {output_file}")
    return report
