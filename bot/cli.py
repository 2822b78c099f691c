"""The ``musicbot`` command line: ``run`` the bot, a ``worker``, ``generate`` music locally, ``bench``,
``random-model``, ``backup``, ``status``, ``copy-db``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from bot.logs import configure_logging
from bot.settings import MODEL_SIZES, Settings, SettingsError

BENCH_SECONDS = 5.0
_STARTED = time.perf_counter()  # as the command line module is imported: the start of a command


def entry() -> NoReturn:
    """The ``musicbot`` command itself: :func:`main`, then the process ends. After ``generate`` it ends
    at once instead of tearing the interpreter down object by object: with torch and transformers
    loaded, that teardown takes longer than writing the file (1.5 s measured on a 2-core EPYC), and
    the command has nothing left to clean up."""
    sys.exit(main(end_process=True))


def main(argv: Sequence[str] | None = None, *, end_process: bool = False) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    guard = configure_logging(args.verbose)
    try:
        settings = Settings.from_env()
        guard.add_secret(settings.discord_token)
        code = int(args.handler(args, settings) or 0)
    except SettingsError as exc:
        print(f"musicbot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("musicbot: interrupted", file=sys.stderr)
        return 130
    if end_process and args.handler is _generate:
        _end_process(code)
    return code


def _end_process(code: int) -> NoReturn:
    """Exit now, after what an orderly exit would wait for: threads that are not daemons (a weight cache
    file still being written) and what was printed or logged. The command's own files are closed."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musicbot", description="Make music with MusicGen, from Discord or here."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="start the Discord bot (settings from the environment / .env)")
    run.set_defaults(handler=_run)

    gen = commands.add_parser("generate", help="make music locally and write it to a file")
    gen.add_argument("prompt", help="what the music should be, e.g. 'calm lo-fi piano, rain'")
    gen.add_argument("--duration", type=float, default=10.0, help="seconds of music (default 10)")
    gen.add_argument(
        "--model",
        default=None,
        help=f"{', '.join(MODEL_SIZES)}, a hub id or a local directory (default: MUSICBOT_MODEL)",
    )
    gen.add_argument("--variations", type=int, default=1, help="how many different takes, 1-4 (default 1)")
    gen.add_argument("--seed", type=int, default=None, help="repeat a result exactly (default: random)")
    gen.add_argument(
        "--guidance", type=float, default=3.0, help="how closely to follow the prompt (default 3)"
    )
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    gen.add_argument("--top-k", type=int, default=250, help="sample from the k likeliest codes (default 250)")
    gen.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling, 0 = off (default 0)")
    gen.add_argument(
        "--melody", type=Path, default=None, help="an audio file whose tune to follow (melody model)"
    )
    gen.add_argument(
        "--loop", action="store_true", help="make a seamless loop (no fades, the end flows into the start)"
    )
    gen.add_argument(
        "--extend", type=Path, default=None, help="continue this audio file by --duration seconds"
    )
    gen.add_argument("-o", "--output", type=Path, required=True, help="where to write: .wav or .flac")
    gen.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None, help="default: MUSICBOT_DEVICE"
    )
    gen.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16", "int8"),
        default=None,
        help="default: MUSICBOT_DTYPE",
    )
    gen.add_argument(
        "--timings",
        action="store_true",
        help="print where the time went: start-up, loading, preparing, first step, generating, writing",
    )
    gen.set_defaults(handler=_generate)

    bench = commands.add_parser("bench", help="the speed table: ours against the classic transformers recipe")
    bench.add_argument(
        "--arch",
        choices=MODEL_SIZES,
        nargs="+",
        default=None,
        help="real architectures to build with random weights, one table each (default small;"
        " with --device cuda: small medium large stereo-small)",
    )
    bench.add_argument(
        "--seconds", type=float, default=BENCH_SECONDS, help="seconds of audio per run (default 5)"
    )
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--no-classic", action="store_true", help="skip the slow fp32 generate baseline")
    bench.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs of each setup; the fastest counts (default 2; with --parts 5)",
    )
    bench.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="where to write the figures as JSON (default bench-results.json, cold-results.json,"
        " quality-results.json or parts-results.json)",
    )
    bench.add_argument(
        "--quality",
        action="store_true",
        help="the quality guard instead: logits of each dtype against fp32, greedy codes against bf16"
        " (CPU; --arch's first size)",
    )
    bench.add_argument(
        "--parts",
        action="store_true",
        help="the int8 step's parts instead, at one request's rows and four's: the products, the"
        " self-attention, reading its caches (the memory's floor for it), the text's attention (CPU with"
        " our int8 kernels; --arch's first size)",
    )
    bench.add_argument(
        "--cold",
        action="store_true",
        help="whole processes from the start instead: the classic recipe as a script against"
        " `musicbot generate`, each stage timed (CPU; default --seconds 4)",
    )
    bench.add_argument(
        "--model",
        type=Path,
        default=None,
        help="with --cold: a checkpoint directory to use (default: a random one of --arch, saved first)",
    )
    bench.add_argument(
        "--dtypes",
        nargs="+",
        default=["auto", "int8"],
        choices=("auto", "float32", "bfloat16", "int8"),
        help="with --cold: the dtypes of our runs (default auto int8)",
    )
    bench.add_argument(
        "--drop-caches",
        action="store_true",
        help="with --cold: empty the page cache before each run, as after a reboot (root only)",
    )
    bench.set_defaults(handler=_bench)

    rand = commands.add_parser(
        "random-model", help="save a MusicGen with random weights (offline trials: makes noise, not music)"
    )
    rand.add_argument("directory", type=Path, help="where to save it (then use it with --model DIRECTORY)")
    rand.add_argument(
        "--arch",
        choices=("tiny", "tiny-melody", "tiny-stereo", *MODEL_SIZES),
        default="tiny",
        help="tiny (1 MB, fast) or a real architecture (default tiny)",
    )
    rand.set_defaults(handler=_random_model)

    backup = commands.add_parser(
        "backup", help="a consistent copy of the database (MUSICBOT_DB), also while the bot runs"
    )
    backup.add_argument("path", type=Path, help="the new SQLite file to write (it must not exist)")
    backup.set_defaults(handler=_backup)

    worker = commands.add_parser(
        "worker", help="a generation worker process serving the queue in MUSICBOT_DB (one per GPU)"
    )
    worker.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: MUSICBOT_DEVICE)")
    worker.add_argument(
        "--id", default=None, help="the worker's name in `musicbot status` (default: made up)"
    )
    worker.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    worker.set_defaults(handler=_worker)

    status = commands.add_parser("status", help="the workers, the queue and recent failures (MUSICBOT_DB)")
    status.set_defaults(handler=_status)

    copy = commands.add_parser(
        "copy-db",
        help="copy every job, track, limit and setting into a new database, e.g. SQLite into PostgreSQL",
    )
    copy.add_argument("source", help="a SQLite file or postgresql:// URL (stop the bot first)")
    copy.add_argument("target", help="a new SQLite file or an empty postgresql:// database")
    copy.set_defaults(handler=_copy_db)
    return parser


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from bot.runner import make_worker_factory
    from bot.worker_process import WorkerStartError, serve, worker_settings

    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    settings = worker_settings(settings, args.device)
    try:
        asyncio.run(
            serve(
                settings,
                make_worker_factory(settings, quiet=not args.verbose),
                worker_id=args.id,
                supervised=args.supervised,
            )
        )
    except WorkerStartError as exc:
        print(f"musicbot: {exc}", file=sys.stderr)
        return 2
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from bot.jobs import DatabaseError
    from bot.status import fleet_status

    try:
        print(asyncio.run(fleet_status(settings)))
    except DatabaseError as exc:
        return _fail(str(exc))
    return 0


def _copy_db(args: argparse.Namespace, settings: Settings) -> int:
    from bot.jobs import DatabaseError
    from bot.jobs.transfer import copy_database

    try:
        info = asyncio.run(copy_database(args.source, args.target))
    except DatabaseError as exc:
        return _fail(str(exc))
    moved = ", ".join(f"{count} {table}" for table, count in info.rows.items() if count)
    print(f"copied {moved or 'nothing (the source is empty)'} into {_shown(args.target)}")
    return 0


def _shown(target: str) -> str:
    from bot.jobs.pgdb import redact

    return redact(target)


def _backup(args: argparse.Namespace, settings: Settings) -> int:
    from bot.jobs import DatabaseError, backup_database

    try:
        if settings.shared_database:
            from bot.jobs.transfer import backup_shared

            info = asyncio.run(backup_shared(settings.database, args.path))
        else:
            info = backup_database(settings.db_path, args.path)
    except DatabaseError as exc:
        return _fail(str(exc))
    print(
        f"backed up {_shown(settings.database)} to {info.path}: {info.jobs} jobs,"
        f" {info.bytes / 2**20:.1f} MiB, integrity check ok"
    )
    return 0


def _random_model(args: argparse.Namespace, settings: Settings) -> int:
    quiet_model_stack(args.verbose)
    from generation.random_models import architecture, save_model, tiny_architecture

    arch = (
        tiny_architecture(melody=args.arch == "tiny-melody", stereo=args.arch == "tiny-stereo")
        if args.arch.startswith("tiny")
        else architecture(args.arch)
    )
    save_model(arch, args.directory)
    print(f"saved a random-weight {args.arch} model to {args.directory}")
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:
    import bot.supervisor
    from bot.runner import StartupError, run

    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    try:
        asyncio.run(run(settings, worker_command=bot.supervisor.worker_command(args.verbose)))
    except StartupError as exc:
        print(f"musicbot: {exc}", file=sys.stderr)
        return 2
    except asyncio.CancelledError:
        print("musicbot: stopped at once (jobs that were running wait for the next start)", file=sys.stderr)
        return 130
    return 0


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    quiet_model_stack(args.verbose)
    from generation.bench import run_bench

    if args.repeat is None:
        args.repeat = 5 if args.parts else 2
    if args.repeat < 1:
        return _fail("--repeat must be at least 1")
    if sum((args.cold, args.quality, args.parts)) > 1:
        return _fail("--cold, --quality and --parts are separate runs: choose one")
    if args.parts:
        from generation.step_parts import run_parts

        figures = run_parts(
            arch=(args.arch or ["small"])[0],
            seconds=args.seconds,
            repeat=args.repeat,
            out=args.output or Path("parts-results.json"),
        )
        return 0 if figures is not None else 1
    if args.cold:
        return _cold_bench(args, args.output or Path("cold-results.json"))
    if args.quality:
        from generation.quality import run_quality

        run_quality(arch=(args.arch or ["small"])[0], out=args.output or Path("quality-results.json"))
        return 0
    output = args.output or Path("bench-results.json")
    archs = args.arch or (CUDA_BENCH if args.device.startswith("cuda") else ["small"])
    for arch in archs:
        out = output if len(archs) == 1 else output.with_stem(f"{output.stem}-{arch}")
        run_bench(
            arch=arch,
            seconds=args.seconds,
            device=args.device,
            classic=not args.no_classic,
            repeat=args.repeat,
            out=out,
        )
    return 0


def _cold_bench(args: argparse.Namespace, output: Path) -> int:
    import tempfile

    from generation.cold_bench import run_cold_bench
    from generation.random_models import architecture, save_model

    seconds = args.seconds if args.seconds != BENCH_SECONDS else 4.0
    if args.model is not None and not (args.model / "config.json").is_file():
        return _fail(f"no checkpoint at {args.model}: the directory must hold config.json and the weights")
    try:
        if args.model is not None:
            run_cold_bench(args.model, seconds, args.dtypes, args.repeat, args.drop_caches, output)
            return 0
        arch = (args.arch or ["small"])[0]
        with tempfile.TemporaryDirectory() as scratch:
            print(f"saving a random-weight {arch} checkpoint to run from...", file=sys.stderr)
            directory = save_model(architecture(arch), Path(scratch) / arch)
            run_cold_bench(directory, seconds, args.dtypes, args.repeat, args.drop_caches, output)
    except RuntimeError as exc:  # a run that failed (its own message), or a page cache we may not drop
        return _fail(str(exc))
    return 0


CUDA_BENCH = ["small", "medium", "large", "stereo-small"]  # the shapes a GPU bench covers by default


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    timings = _Timings()
    from generation import AudioInputError, GenerationError, GenerationRequest, SamplingParams
    from generation.audio import decode_audio, encode_audio

    fmt = args.output.suffix.lower().lstrip(".")
    if fmt not in ("wav", "flac"):
        return _fail(f"the output must end in .wav or .flac (got {args.output.name})")
    try:
        melody = extend = None
        if args.melody is not None:
            from generation.melody import load_melody

            reference = load_melody(_read(args.melody))
            melody = reference.clip
            if reference.note:
                print(f"note: {reference.note}", file=sys.stderr)
        if args.extend is not None:
            extend = decode_audio(_read(args.extend))
        request = GenerationRequest(
            prompt=args.prompt,
            duration=args.duration,
            sampling=SamplingParams(args.guidance, args.temperature, args.top_k, args.top_p),
            variations=args.variations,
            seed=args.seed,
            loop=args.loop,
            continuation=extend,
            melody=melody,
        ).with_seed()
    except (GenerationError, OSError) as exc:
        return _fail(str(exc))

    size = args.model or ("melody" if melody is not None else settings.model)
    source = settings.model_source(size)
    print(f"loading {size} ({source})...", file=sys.stderr)
    quiet_model_stack(args.verbose)
    try:
        from generation.engine import load_engine

        timings.lap("start-up")
        engine = load_engine(
            source,
            name=size,
            device=args.device or settings.device,
            dtype=args.dtype or settings.dtype,
            kernels=settings.kernels != "off",
        )
        timings.add(engine.timings)
        started = time.perf_counter()
        with _ProgressBar(timings.first_step) as bar:
            [result] = engine.generate([request], progress=bar.update)
        timings.lap("generation")
    except AudioInputError as exc:
        return _fail(str(exc))
    except GenerationError as exc:
        return _fail(str(exc))
    elapsed = time.perf_counter() - started

    paths = _output_paths(args.output, len(result.tracks))
    for path, track in zip(paths, result.tracks, strict=True):
        path.write_bytes(encode_audio(track.audio, result.sample_rate, fmt))
    timings.lap("write")
    seeds = ", ".join(str(t.seed) for t in result.tracks)
    channels = "stereo" if result.channels == 2 else "mono"
    print(
        f"wrote {', '.join(str(p) for p in paths)}: {result.seconds:.2f} s of {channels} at"
        f" {result.sample_rate} Hz, seed {seeds}, model {engine.info.name} ({engine.info.device},"
        f" {engine.info.dtype}), {elapsed:.1f} s"
    )
    for note in result.notes:
        print(f"note: {note}")
    if args.timings:
        print(timings.line(), file=sys.stderr)
    return 0


class _Timings:
    """Seconds spent in each stage of ``musicbot generate``, from the command's start (the interpreter's
    own start-up before it is not seen here)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._last = _STARTED

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = now - self._last
        self._last = now

    def add(self, stages: dict[str, float]) -> None:
        """Stages measured elsewhere, ending now."""
        self.stages.update(stages)
        self._last = time.perf_counter()

    def first_step(self) -> None:
        """Up to the first decoding step: conditioning on the prompt and the prefill."""
        self.lap("first step")

    def line(self) -> str:
        return "timings: " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in self.stages.items())


def quiet_model_stack(verbose: bool) -> None:
    """Silence the model stack's own warnings and bars unless -v asks for everything."""
    if not verbose:
        from generation.loader import quiet_transformers

        quiet_transformers()


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(1, count + 1)]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror or exc}") from None


def _fail(message: str) -> int:
    print(f"musicbot: {message}", file=sys.stderr)
    return 1


class _ProgressBar:
    """A tqdm bar on stderr, fed by the engine's per-step progress callback; ``on_first`` is called at the
    first step."""

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self._on_first = on_first

    def __enter__(self) -> _ProgressBar:
        from tqdm import tqdm

        self._bar = tqdm(total=None, unit="step", file=sys.stderr, desc="generating", leave=False)
        return self

    def update(self, done: int, total: int) -> None:
        if self._on_first is not None:
            self._on_first()
            self._on_first = None
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
