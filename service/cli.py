"""The ``limbic`` command: serve, analyze, and build or inspect vector sets."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from limbic.service.config import Settings

if TYPE_CHECKING:
    from limbic.service.protocol import AnalyzeItem


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides, **extra)


def _fail(message: str) -> int:
    print(f"limbic: error: {message}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from limbic.service import runtime
    from limbic.service.app import create_app

    settings = _settings(args)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runtime.key_ring(settings)  # no keys on a public address, unreadable key files: before anything loads
        asyncio.run(_probe_sink(settings))  # fail fast, before the model loads
        engine = runtime.load_engine(settings)
        runtime.chat_renderer(settings, engine)  # a bad template or parser name stops start-up here
    except runtime.StartupError as exc:
        return _fail(str(exc))
    print(
        f"limbic: serving {engine.model_name} on http://{settings.host}:{settings.port}/v1 "
        f"(layer {engine.vectors.manifest.layer}, {len(engine.vectors.emotions)} emotions)",
        file=sys.stderr,
    )
    app = create_app(settings, engine, close_engine=True)
    # SIGTERM: stop accepting, let in-flight generations finish for shutdown_drain_s, then end the rest (a
    # stream with an in-band error event); uvicorn's own deadline, a little later, is the backstop.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=settings.shutdown_drain_s + 5,
    )
    DrainingServer(config, app.state.drain, settings.shutdown_drain_s).run()
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Prints a keys-file line (the key's SHA-256); ``new`` also makes the key, shown once on stderr."""
    import secrets

    from limbic.service.guard import hashed_line

    if args.action == "new":
        key = "lmb-" + secrets.token_urlsafe(32)
        print(f"key (give it to the client; it is not stored): {key}", file=sys.stderr)
    else:
        key = sys.stdin.readline().strip()
        if not key:
            return _fail("give the key on standard input, e.g. `limbic keys hash < key.txt`")
    print(hashed_line(key))
    return 0


def DrainingServer(config: Any, drain: Any, drain_s: float) -> Any:
    """uvicorn's server, starting limbic's drain clock when a shutdown signal arrives."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            drain.begin(drain_s)
            super().handle_exit(sig, frame)

    return _Server(config)


async def _probe_sink(settings: Settings) -> None:
    from limbic.service import runtime

    if settings.redis_url:  # the spool is opened by the server itself
        await (await runtime.open_redis_sink(settings)).close()


def _read_items(stream: TextIO, defaults: dict[str, Any]) -> list[tuple[Any, AnalyzeItem | None, str | None]]:
    """Every input line as (id, item, problem): a bad line is reported and skipped, never fatal."""
    from limbic.service.protocol import AnalyzeItem
    from pydantic import ValidationError

    items: list[tuple[Any, AnalyzeItem | None, str | None]] = []
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            items.append((None, None, f"line {lineno}: not JSON ({exc.msg})"))
            continue
        item_id = raw.get("id") if isinstance(raw, dict) else None
        try:
            items.append((item_id, AnalyzeItem.model_validate(defaults | raw), None))
        except (ValidationError, TypeError) as exc:
            problem = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "not an object"
            expected = '{"id": ..., "text": "..."} or {"id": ..., "messages": [...]}'
            items.append((item_id, None, f"line {lineno}: expected {expected} ({problem})"))
    return items


# Scoring throughput and vLLM's start-up on this class of machine (2 CPU cores, the 135M default): below
# this many tokens the transformers engine has finished before vLLM would have started.
_VLLM_WORTH_IT_TOKENS = 200_000


def _analysis_engine(settings: Settings, items: list, verbose: bool) -> Settings:
    """The engine that finishes the input soonest, unless the user chose one; says which and why."""
    if settings.engine != "auto":
        return settings
    texts = [i.text or " ".join(m.content for m in i.messages or ()) for _, i, _ in items if i is not None]
    estimate = sum(len(t) for t in texts) // 4  # about four characters a token
    from limbic.service import runtime

    use_vllm = runtime.vllm_available() and estimate > _VLLM_WORTH_IT_TOKENS
    why = "worth vLLM's start-up" if use_vllm else "less than vLLM's start-up would take"
    if verbose or use_vllm:
        print(
            f"limbic analyze: {len(texts)} items, ~{estimate} tokens: {'vllm' if use_vllm else 'transformers'} "
            f"engine ({why}; --engine to choose)",
            file=sys.stderr,
        )
    return settings.model_copy(update={"engine": "vllm" if use_vllm else "transformers"})


def cmd_analyze(args: argparse.Namespace) -> int:
    from limbic.monitors.engine import EngineStartupError
    from limbic.service import runtime
    from limbic.service.analysis import analyze_item
    from tqdm import tqdm

    if not args.verbose:
        # Engine logs (vLLM's INFO lines, transformers' notices) stay out of the way of the JSON output.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        logging.basicConfig(level=logging.WARNING)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    source = open(args.file) if args.file not in (None, "-") else sys.stdin  # noqa: SIM115
    with source:
        defaults = {"tokens": args.tokens, "per_message": args.per_message}
        items = _read_items(source, {k: v for k, v in defaults.items() if v is not None})
    try:
        settings = _analysis_engine(_settings(args), items, args.verbose)
        engine = runtime.load_engine(settings)
    except runtime.StartupError as exc:
        return _fail(str(exc))
    failures = 0

    async def analyze_all() -> None:
        nonlocal failures
        await engine.start()
        try:
            for item_id, item, problem in tqdm(items, desc="analyze", unit="item", disable=len(items) < 2 or None):
                result = None
                if item is not None:
                    try:
                        result = await analyze_item(engine, item)
                    except ValueError as exc:
                        problem = str(exc)
                if result is None:
                    failures += 1
                    tqdm.write(f"limbic analyze: {problem}", file=sys.stderr)
                    result = {"id": item_id, "error": problem}
                print(json.dumps(result), flush=True)
        finally:
            await engine.close()

    try:
        asyncio.run(analyze_all())
    except EngineStartupError as exc:
        return _fail(str(exc))
    return 1 if failures else 0


def cmd_vectors_extract(args: argparse.Namespace) -> int:
    from limbic.monitors import model_source
    from limbic.monitors.hf import model as hf_model
    from limbic.vectors import storage
    from limbic.vectors.extraction import ExtractionConfig, extract

    try:
        source = model_source.resolve(args.model)
    except model_source.ModelSourceError as exc:
        return _fail(str(exc))
    out = Path(args.out) if args.out else storage.bundled_folder(source.name)
    loaded = hf_model.load(source)
    config = ExtractionConfig(
        emotions=args.emotions.split(",") if args.emotions else None,
        layer=args.layer,
        skip_tokens=args.skip_tokens,
        stories_per_emotion=args.stories_per_emotion,
        neutral_dialogues=args.neutral_dialogues,
        cache=None if args.no_cache else model_source.cache_dir() / "activations",
        transcripts=not args.no_transcripts,
        transcript_weight=args.transcript_weight,
        **({} if args.transcript_weights is None else {"transcript_weights": args.transcript_weights}),
        readout=args.readout,
        **({} if args.probe_c is None else {"probe_c": args.probe_c}),
        **({} if args.probe_story_share is None else {"probe_story_share": args.probe_story_share}),
    )
    try:
        vectors = extract(loaded, config)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    vectors.save(out)
    sweep = vectors.manifest.extraction["layer_sweep_heldout_top1"]
    print(f"limbic: wrote {len(vectors.emotions)} vectors at layer {vectors.manifest.layer} to {out}", file=sys.stderr)
    print(f"limbic: held-out top-1 by layer: {sweep}", file=sys.stderr)
    return 0


def _model_with_vectors(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model (transformers) and its vector set, checked against each other; raises CommandError."""
    from limbic.monitors import model_source
    from limbic.monitors.hf import model as hf_model
    from limbic.vectors import storage

    try:
        source = model_source.resolve(args.model)
        vectors = storage.load(Path(args.vectors) if args.vectors else storage.bundled_folder(source.name))
        loaded = hf_model.load(source)
        storage.check_matches(vectors, loaded.identity, f"limbic vectors extract --model {args.model or 'default'}")
    except (model_source.ModelSourceError, storage.VectorFileError) as exc:
        raise CommandError(str(exc)) from exc
    return loaded, vectors


class CommandError(Exception):
    """A user-facing failure of a command: printed as ``limbic: error: ...``, exit status 2."""


def cmd_vectors_report(args: argparse.Namespace) -> int:
    from limbic.monitors import model_source
    from limbic.vectors import report

    try:
        loaded, vectors = _model_with_vectors(args)
    except CommandError as exc:
        return _fail(str(exc))
    config = report.ReportConfig(
        emotions=args.emotions.split(",") if args.emotions else None,
        stories_per_emotion=args.stories_per_emotion,
        steering_strength=args.steering_strength,
        cache=model_source.cache_dir() / "activations",
        external_scenarios=args.external_scenarios,
    )
    try:
        summary = report.build(loaded, vectors, Path(args.out), config)
    except ValueError as exc:
        return _fail(str(exc))
    print(json.dumps(summary, indent=2))
    print(f"limbic: wrote {args.out} and {Path(args.out).with_name('summary.json')}", file=sys.stderr)
    return 0


def _text_argument(value: str) -> str:
    """A text given inline, or ``@path`` for a file's contents."""
    return Path(value[1:]).read_text() if value.startswith("@") else value


def cmd_vectors_patch(args: argparse.Namespace) -> int:
    from limbic.vectors.patching import patch

    try:
        loaded, vectors = _model_with_vectors(args)
        span = tuple(int(x) for x in args.span.split(":")) if args.span else None
        result = patch(
            loaded,
            vectors,
            _text_argument(args.source),
            _text_argument(args.target),
            args.layer,
            args.positions,
            span,  # type: ignore[arg-type]
            args.new_tokens,
            args.emotions.split(",") if args.emotions else None,
        )
    except (CommandError, ValueError, OSError) as exc:
        return _fail(str(exc))
    print(json.dumps(result, indent=2))
    return 0


def cmd_vectors_show(args: argparse.Namespace) -> int:
    from limbic.monitors import model_source
    from limbic.vectors import storage

    folder = Path(args.vectors) if args.vectors else storage.bundled_folder(model_source.DEFAULT_MODEL_NAME)
    try:
        vectors = storage.load(folder)
    except storage.VectorFileError as exc:
        return _fail(str(exc))
    m = vectors.manifest
    print(
        json.dumps(
            {
                "folder": str(folder),
                "model": vars(m.model),
                "layer": m.layer,
                "emotions": m.emotions,
                "extraction": m.extraction,
            },
            indent=2,
        )
    )
    return 0


def _weights_arg(value: str) -> dict[str, float]:
    weights = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        emotion, _, weight = item.partition("=")
        try:
            weights[emotion.strip()] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not emotion=weight") from None
    return weights


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {value}")
    return number


def _share(value: str) -> float:
    number = float(value)
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, not {value}")
    return number


def _layer_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer number or 'auto', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="limbic", description="Emotion-vector safety monitor for LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="local Hugging Face folder or .gguf file (default: SmolLM2-135M-Instruct)")
        p.add_argument("--vectors", type=Path, help="vector set folder (default: the bundled set for the model)")
        p.add_argument(
            "--engine", choices=["auto", "vllm", "transformers"], help="auto (default): vLLM where installed"
        )
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model weights (default float32)")
        p.add_argument(
            "--vllm-enforce-eager",
            dest="vllm_enforce_eager",
            action="store_true",
            default=None,
            help="skip torch.compile: starts in ~30 s instead of ~3 min the first time, serves slower",
        )

    serve = commands.add_parser("serve", help="start the OpenAI-compatible server")
    model_flags(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--served-model-name", dest="served_model_name")
    serve.add_argument("--redis-url", dest="redis_url", help="keep alert events in this Redis (else in memory)")
    serve.add_argument(
        "--alertmanager-url", dest="alertmanager_url", help="also push alert events to this Alertmanager"
    )
    serve.add_argument("--device", help="torch device, e.g. cpu or cuda")
    serve.add_argument(
        "--chat-template", dest="chat_template", type=Path, help="Jinja chat template file for every chat request"
    )
    serve.add_argument(
        "--tool-call-parser",
        dest="tool_call_parser",
        help="vLLM tool parser for tool_choice auto (default: hermes with limbic's bundled ChatML template)",
    )
    serve.add_argument(
        "--allow-unauthenticated",
        dest="allow_unauthenticated",
        action="store_true",
        default=None,
        help="serve a non-loopback --host without API keys (only behind a proxy that authenticates)",
    )
    serve.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, help="larger request bodies get a 413")
    serve.set_defaults(func=cmd_serve)

    keys = commands.add_parser("keys", help="API keys for LIMBIC_API_KEYS_FILE / LIMBIC_ADMIN_KEYS_FILE")
    keys.add_argument("action", choices=["new", "hash"], help="new: a random key and its file line; hash: a key's line")
    keys.set_defaults(func=cmd_keys)

    analyze = commands.add_parser(
        "analyze", help="score JSON lines: {id, text} as plain text, {id, messages} as a chat transcript"
    )
    model_flags(analyze)
    analyze.add_argument("file", nargs="?", help="input file (default: stdin)")
    analyze.add_argument(
        "--tokens",
        choices=["assistant", "user", "all"],
        help="transcripts: whose tokens the scores cover (default assistant; a line's own `tokens` wins)",
    )
    analyze.add_argument(
        "--per-message", dest="per_message", action="store_true", default=None, help="transcripts: each message too"
    )
    analyze.add_argument("--verbose", action="store_true", help="show the engine's logs")
    analyze.set_defaults(func=cmd_analyze)

    vectors = commands.add_parser("vectors", help="build or inspect emotion vectors").add_subparsers(
        dest="vectors_command", required=True
    )
    extract = vectors.add_parser("extract", help="extract vectors from the story corpus")
    extract.add_argument("--model", help="local Hugging Face folder or .gguf file (default: the default model)")
    extract.add_argument("--out", help="output folder (default: the bundled folder for the model)")
    extract.add_argument(
        "--layer", type=_layer_arg, help="monitored layer, or 'auto' for the sweep's best (default: two thirds deep)"
    )
    extract.add_argument("--emotions", help="comma-separated subset (default: all with stories)")
    extract.add_argument("--skip-tokens", type=int, default=50, help="average story tokens from this one on")
    extract.add_argument("--stories-per-emotion", type=int, help="cap per emotion and split (quick runs)")
    extract.add_argument("--neutral-dialogues", type=int, help="cap on neutral dialogues (quick runs)")
    extract.add_argument("--no-cache", action="store_true", help="recompute story activations (no disk cache)")
    extract.add_argument(
        "--no-transcripts", action="store_true", help="stories only: no assistant-turn directions from transcripts"
    )
    extract.add_argument(
        "--transcript-weight",
        type=float,
        default=0.5,
        help="weight of the assistant-turn direction against the story direction (default 0.5, from the study)",
    )
    extract.add_argument(
        "--transcript-weights",
        type=_weights_arg,
        help="per-emotion weights over --transcript-weight, e.g. desperate=1,panicked=1 (default none)",
    )
    extract.add_argument(
        "--readout",
        choices=["probe", "mean"],
        default="probe",
        help="probe (default): read the emotions the transcripts have with a probe trained on stories and "
        "transcripts, steer with the difference of means; mean: read along the steering directions",
    )
    extract.add_argument(
        "--probe-c",
        type=_positive_float,
        help="inverse regularisation strength of the readout probes (default: the study's choice)",
    )
    extract.add_argument(
        "--probe-story-share",
        type=_share,
        help="the stories' share of the probes' training weight, the transcripts have the rest (default: the "
        "study's choice)",
    )
    extract.set_defaults(func=cmd_vectors_extract)
    report = vectors.add_parser("report", help="validate a vector set and write an HTML report with figures")
    report.add_argument("--model", help="local Hugging Face folder or .gguf file (default: the default model)")
    report.add_argument("--vectors", help="vector set folder (default: the bundled set for the model)")
    report.add_argument("--out", default="report/report.html", help="HTML file to write (summary.json beside it)")
    report.add_argument("--emotions", help="comma-separated subset to evaluate (default: all)")
    report.add_argument("--stories-per-emotion", type=int, help="cap per emotion and split (quick runs)")
    report.add_argument("--steering-strength", type=float, default=0.5, help="fraction of the residual norm")
    report.add_argument(
        "--external-scenarios", type=int, help="the external transcript set's first N scenarios only (quick runs)"
    )
    report.set_defaults(func=cmd_vectors_report)
    patch = vectors.add_parser(
        "patch", help="activation patching: a source text's residual into a target's run, scores and continuations"
    )
    patch.add_argument("--model", help="local Hugging Face folder or .gguf file (default: the default model)")
    patch.add_argument("--vectors", help="vector set folder (default: the bundled set for the model)")
    patch.add_argument("--source", required=True, help="source text, or @FILE")
    patch.add_argument("--target", required=True, help="target text, or @FILE")
    patch.add_argument("--layer", type=int, required=True, help="decoder layer whose output residual is copied")
    patch.add_argument("--positions", choices=["last", "span", "aligned"], default="last")
    patch.add_argument("--span", help="START:END token positions (with --positions span)")
    patch.add_argument("--new-tokens", dest="new_tokens", type=int, default=20, help="greedy continuation length")
    patch.add_argument("--emotions", help="comma-separated emotions to report (default: all)")
    patch.set_defaults(func=cmd_vectors_patch)

    show = vectors.add_parser("show", help="print a vector set's manifest")
    show.add_argument("--vectors", help="vector set folder (default: the bundled default)")
    show.set_defaults(func=cmd_vectors_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as exc:  # a malformed LIMBIC_* variable or flag
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _fail(f"invalid settings: {problems}")


if __name__ == "__main__":
    raise SystemExit(main())
