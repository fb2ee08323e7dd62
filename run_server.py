"""Serve CogVLM2-Video with the OpenAI chat-completions API and a web page (FastAPI + uvicorn).

    python run_server.py --config configs/cogvlm2/predict_cogvlm2_video_tiny.yaml --port 8000

Flags as run_predict.py (--config, --load_checkpoint, --device_target, --device_id); --config may be
left out when --load_checkpoint DIR is given (the engine is then built from DIR's config.json). The
model is loaded before the port opens; /health answers 200 once both graphs are compiled. SIGTERM or
Ctrl-C: stop accepting, finish the requests in flight (at most --shutdown_timeout seconds), exit 0.
A bad flag, config or checkpoint is one line on stderr and exit code 2. Also installed as
``cogvlm2-server``.
"""
import argparse
import logging
import os
import signal
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python run_server.py --config "
                                            "configs/cogvlm2/predict_cogvlm2_video_tiny.yaml --port 8000")
    parser.add_argument("--config", default=None, help="YAML config (configs/cogvlm2/predict_*.yaml)")
    parser.add_argument("--load_checkpoint", default=None,
                        help="checkpoint directory (HF download or tools/convert_weight.py output); without "
                             "--config the model is built from its config.json")
    parser.add_argument("--device_target", default=None, choices=["CPU", "Ascend", "GPU"],
                        help="overrides context.device_target")
    parser.add_argument("--device_id", default=None, type=int, help="overrides context.device_id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", default=8000, type=int, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--max_batch_size", default=None, type=int,
                        help="sequences decoded together (default: the config's, else 8)")
    parser.add_argument("--max_queue", default=64, type=int,
                        help="requests waiting beyond the batch; more are refused with 429 (default 64)")
    parser.add_argument("--media_root", default=None,
                        help="the only folder whose files requests may name (file:// URLs or paths); "
                             "default: no file access, media come as data: URLs")
    parser.add_argument("--max_media_mb", default=100.0, type=float,
                        help="largest video/image a request may carry, in MB (default 100); larger: 413")
    parser.add_argument("--allow_remote_media", action="store_true",
                        help="let requests name http(s):// media (downloaded within --max_media_mb and "
                             "--remote_timeout)")
    parser.add_argument("--remote_timeout", default=30.0, type=float, help="seconds per download (default 30)")
    parser.add_argument("--api_key", default=os.environ.get("COGVLM2_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $COGVLM2_API_KEY, else none)")
    parser.add_argument("--model_name", default="cogvlm2-video", help="the model id clients name")
    parser.add_argument("--shutdown_timeout", default=30.0, type=float,
                        help="on SIGTERM, wait at most this long for requests in flight (default 30)")
    parser.add_argument("--verbose", action="store_true", help="MindSpore/mindformers logs and tracebacks")
    return parser.parse_args(argv)


def check_args(args):
    """Flag errors found before anything heavy is imported (ValueError -> one line, exit 2)."""
    if args.config is None and args.load_checkpoint is None:
        raise ValueError("give --config YAML, or --load_checkpoint DIR to build the model from DIR's config.json")
    if args.media_root is not None and not os.path.isdir(args.media_root):
        raise ValueError(f"--media_root {args.media_root!r} is not a folder")
    for name in ("max_batch_size",):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if args.max_queue < 0:
        raise ValueError(f"--max_queue must be >= 0, got {args.max_queue}")
    if args.max_media_mb <= 0 or args.remote_timeout <= 0 or args.shutdown_timeout < 0:
        raise ValueError("--max_media_mb and --remote_timeout must be > 0, --shutdown_timeout >= 0")


def build_engine(args):
    from cogvlm2 import CogVLM2Engine
    overrides = {} if args.max_batch_size is None else {"max_batch_size": args.max_batch_size}
    if args.config is None:
        if args.device_target is not None or args.device_id is not None:
            import mindspore as ms
            ms.set_context(**{k: v for k, v in (("device_target", args.device_target),
                                                ("device_id", args.device_id)) if v is not None})
        return CogVLM2Engine.from_pretrained(args.load_checkpoint, **overrides)
    return CogVLM2Engine.from_config(args.config, load_checkpoint=args.load_checkpoint,
                                     device_target=args.device_target, device_id=args.device_id, **overrides)


def serve(args) -> int:
    import socket

    import uvicorn
    import cogvlm2  # noqa: F401  registers the plugin (and loads mindspore before decord)
    from cogvlm2.cogvlm2_server import ServerSettings, create_app
    from cogvlm2.cogvlm2_server_media import MediaPolicy

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))                     # fail early (exit 2) if the port is taken
    print(f"loading the model ({args.config or args.load_checkpoint}) ...", file=sys.stderr, flush=True)
    engine = build_engine(args)
    settings = ServerSettings(model_name=args.model_name, api_key=args.api_key, max_queue=args.max_queue,
                              media=MediaPolicy(media_root=args.media_root,
                                                max_bytes=int(args.max_media_mb * 2 ** 20),
                                                allow_remote=args.allow_remote_media,
                                                remote_timeout=args.remote_timeout))
    app = create_app(engine, settings)
    config = uvicorn.Config(app, log_level="info" if args.verbose else "warning",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    print(f"serving {args.model_name} on http://{host}:{port} (page: /, API: /v1/chat/completions; "
          "ready when GET /health answers 200)", file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM/SIGINT itself (stop accepting, wait for requests in flight) and afterwards
    # re-raises the signal to the handler found at start: make that one a no-op so we close and exit 0
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    try:
        server.run(sockets=[sock])                        # returns after SIGTERM/SIGINT and the graceful wait
    finally:
        engine.close(timeout=args.shutdown_timeout)
    print("server stopped", file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        os.environ.setdefault("GLOG_v", "3")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_args(args)
        return serve(args)
    except KeyboardInterrupt:
        return 0
    except Exception as err:  # pylint: disable=broad-except
        if args.verbose:
            raise
        from cogvlm2.cogvlm2_cli import is_user_error, one_line
        known = is_user_error(err) or isinstance(err, ValueError)
        hint = "" if known else f" ({type(err).__name__}; run with --verbose for the traceback)"
        print(f"error: {one_line(err)}{hint}", file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
