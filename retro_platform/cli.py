"""The `retro` command: demo, build-db, verify-db, query-neighbors, add-docs, neighbors, train, eval, generate, compare.

Every subcommand takes ``--config <preset or YAML>`` and any number of ``--set section.field=value``
overrides, and runs the matching platform function. Errors in input (bad config values, malformed
corpus files, mismatched database and model, missing files) print one clear line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from retro_platform import storage
from retro_platform.config import PlatformConfig, load_config
from retro_platform.errors import RetroError, UserError
from retro_platform.output import configure_output

logger = logging.getLogger("retro")


def _add_config_args(parser: argparse.ArgumentParser, default: str = "demo") -> None:
    parser.add_argument("--config", default=default, help=f"preset name or YAML path (default: {default})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 (repeatable)",
    )


# ---- subcommands: each imports its stage lazily so `retro --help` stays fast ---------------------------


def cmd_build_db(config: PlatformConfig, args: argparse.Namespace) -> None:
    """Build (or resume, or repair) the retrieval database."""
    from retro_platform.commands.build_db import build_database

    build_database(config)


def cmd_verify_db(config: PlatformConfig, args: argparse.Namespace) -> None:
    """Check every file of the database against its sha256 (stages only check sizes and times)."""
    from retro_platform.commands.verify_db import verify_database

    verify_database(config)


def cmd_query_neighbors(config: PlatformConfig, args: argparse.Namespace) -> None:
    """Precompute the neighbour table of every chunk through the pool."""
    from retro_platform.commands.query_neighbors import precompute_neighbors

    precompute_neighbors(config)


def cmd_add_docs(config: PlatformConfig, args: argparse.Namespace) -> None:
    """Add documents to the database (a running `retro serve` reads them from its next request)."""
    from retro_platform.commands.add_docs import add_docs

    add_docs(config, args.files)


def cmd_neighbors(config: PlatformConfig, args: argparse.Namespace) -> None:
    """Print a chunk (or a text) and its neighbours with scores."""
    from retro_platform.commands.neighbors import show_neighbors

    if (args.chunk_id is None) == (args.text is None):
        raise UserError("retro neighbors needs exactly one of --chunk-id N or --text '...'")
    show_neighbors(config, chunk_id=args.chunk_id, text=args.text, k=args.k)


def cmd_train(config: PlatformConfig, args: argparse.Namespace) -> None:
    """Train with Ray Train (resumes a run of the same train.name)."""
    from retro_platform.commands.train import run_training

    run_training(config)


def cmd_eval(config: PlatformConfig, args: argparse.Namespace) -> None:
    """Evaluate a checkpoint: valid loss and bits-per-byte with and without retrieval."""
    from retro_platform.commands.evaluate import run_evaluation

    run_evaluation(config, checkpoint=args.checkpoint)


def cmd_generate(config: PlatformConfig, args: argparse.Namespace) -> None:
    """Generate a completion with live retrieval."""
    from retro_platform.commands.generate import run_generation

    run_generation(config, prompt=args.prompt, checkpoint=args.checkpoint)


def cmd_compare(config: PlatformConfig, args: argparse.Namespace) -> None:
    """Compare the runs of an MLflow experiment."""
    from retro_platform.commands.compare import compare_experiment

    compare_experiment(config, experiment=args.experiment)


def cmd_serve(config: PlatformConfig, args: argparse.Namespace) -> None:
    """Serve a trained model over HTTP on Ray Serve, with live retrieval, until interrupted."""
    from retro_platform.commands.serve import serve_model

    serve_model(config, checkpoint=args.checkpoint, model=args.model, host=args.host, port=args.port)


def cmd_demo(config: PlatformConfig, args: argparse.Namespace) -> None:
    """The whole pipeline on the embedded defaults."""
    from retro_platform.commands.demo import run_demo

    run_demo(config)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `retro` command."""
    parser = argparse.ArgumentParser(prog="retro", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging and the dependencies' routine output"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str, default: str = "demo") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p, default)
        p.set_defaults(func=func)
        return p

    add("demo", cmd_demo, "build the database, train RETRO and a baseline, evaluate, compare, generate")
    add("build-db", cmd_build_db, "build the retrieval database (Ray Data)")
    add("verify-db", cmd_verify_db, "check every database file against its checksum (sha256)")
    add("query-neighbors", cmd_query_neighbors, "precompute the neighbour table (Ray Data over the pool)")
    p = add(
        "add-docs", cmd_add_docs, "add documents to the database (a running `retro serve` reads them at once)"
    )
    p.add_argument(
        "files", nargs="+", help="JSONL/Parquet files, folders of .txt/.md documents or globs, local or s3://"
    )
    p = add("neighbors", cmd_neighbors, "show a chunk's neighbours")
    p.add_argument("--chunk-id", type=int, default=None, help="a chunk id of the database")
    p.add_argument("--text", default=None, help="any text to embed and search for")
    p.add_argument("--k", type=int, default=None, help="neighbours to show (default: model.num_neighbors)")
    add("train", cmd_train, "train on Ray Train (DDP)")
    p = add("eval", cmd_eval, "evaluate a checkpoint (valid loss / bits-per-byte, retrieval on and off)")
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the run's latest)")
    p = add("generate", cmd_generate, "generate text with retrieval every chunk")
    p.add_argument("--prompt", required=True, help="the prompt")
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the run's latest)")
    p = add("serve", cmd_serve, "serve a trained model over HTTP (Ray Serve): completions, documents, a page")
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint dir (default: serve.model or the run's latest)"
    )
    p.add_argument("--model", default=None, help="MLflow model URI, e.g. models:/retro-demo/latest")
    p.add_argument("--host", default=None, help="address to listen on (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port, 8000)")
    p = add("compare", cmd_compare, "compare the runs of an MLflow experiment")
    p.add_argument("--experiment", default=None, help="experiment name (default: tracking.experiment)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `retro` console script."""
    args = build_parser().parse_args(argv)
    # native stderr is filtered only when this is the `retro` program (argv from the command line)
    configure_output(args.verbose, native_stderr=argv is None)
    try:
        config = load_config(args.config, args.overrides)
        storage.check_settings()  # a bad RETRO_CACHE_MAX_GB / RETRO_S3_MAX_ATTEMPTS fails here, not in a task
        args.func(config, args)
    except RetroError as exc:
        logger.debug("details", exc_info=True)
        print(f"retro {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
