"""What the commands print: their stages, one line per logged training step, Ray Data's progress bars in a
terminal, and every warning and error; the dependencies' routine chatter only with ``retro -v``.

Hidden by default, in the driver and in every Ray worker (``-v`` shows all of it again):

* faiss's loader probes (``Could not load library with AVX512 support due to: ModuleNotFoundError(...)``),
  logged at INFO by the ``faiss.loader`` logger while faiss picks the build this CPU can run;
* Ray Data's INFO lines (execution plans, log paths, and the progress blocks it logs every few seconds
  when stdout is not a terminal): ``RAY_DATA_LOG_LEVEL=WARNING``; its progress bars in a terminal stay;
* Ray Train's INFO lines (``Reporting training result ... TrainingReport(...)`` per report and rank,
  worker-group start-up, checkpoint paths): the trainer passes :func:`ray_train_log_level`;
* MLflow's "creating database tables" lines and "Downloading artifacts" bar, sentence-transformers'
  "loading model" line and transformers' "Loading weights" bar (each a fraction of a second);
* Ray's notice that token authentication is on (its default for a local cluster; the warning that it
  is *off* stays visible);
* Ray's ``E ... core_worker.cc`` line "... has constructor arguments in the object store and
  max_restarts > 0". Not caused by this package: Ray Data puts each actor pool's map function in the
  object store and restarts pool actors by default, Ray Train's controller does the same for its
  PreemptionWatcher (ray-project/ray#53727). The controller's copy reaches the driver as a worker log
  line (dropped by :func:`filter_ray_worker_lines`); the driver's own copy is written by Ray's C++ core
  straight to file descriptor 2 (dropped by :func:`filter_native_stderr`).

Workers learn the choice from ``RETRO_VERBOSE`` and the variables of :data:`QUIET_ENV_VARS`, which
``ray_utils.runtime_env_vars`` forwards.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

VERBOSE_ENV = "RETRO_VERBOSE"
"""Set to ``1`` by ``retro -v``: the driver and the workers show the dependencies' INFO output too."""

QUIET_ENV_VARS = {
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
"""Environment of the quiet default (the caller's values win): read by Ray Data, huggingface_hub (the
progress bars of transformers) and MLflow (its "Downloading artifacts" bar when a model is logged)."""

NOISY_LOGGERS = ("faiss.loader", "mlflow.store.db.utils", "sentence_transformers")
"""Loggers whose INFO records are routine progress of a dependency: shown only with ``-v``."""

RAY_CONSTRUCTOR_ARGS_LINE = "has constructor arguments in the object store and max_restarts > 0"
"""The part of Ray's ``core_worker.cc`` error line that identifies it (see the module docstring)."""

_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_RAY_AUTH_ENABLED_NOTICE = "Token authentication is enabled for this Ray cluster"
# Ray Train's "Reporting training result ..." comes from a logger named by this module's file path, which
# the level of its LoggingConfig (applied to "ray.train.*" loggers only) does not reach
_RAY_TRAIN_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"


def is_verbose() -> bool:
    """True when ``retro -v`` (or ``RETRO_VERBOSE=1``) asked for the dependencies' output too."""
    return os.environ.get(VERBOSE_ENV) == "1"


def configure_output(verbose: bool, native_stderr: bool = False) -> None:
    """Logging of a ``retro`` command: INFO for this package (DEBUG with ``verbose``), dependencies quiet.

    ``native_stderr``: also filter what native code writes to file descriptor 2 (see
    :func:`filter_native_stderr`); only for the ``retro`` program itself, not for callers that run
    :func:`retro_platform.cli.main` in their own process (tests, ``jobs/``).
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    verbose = is_verbose()
    if not verbose:
        for name, value in QUIET_ENV_VARS.items():
            os.environ.setdefault(name, value)
        if native_stderr:
            filter_native_stderr()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # the command owns the process's logging: replace handlers bound to an old stderr
    )
    quiet_dependency_loggers()


def quiet_dependency_loggers() -> None:
    """Raise the noisy dependency loggers of this process to WARNING (back to their default with ``-v``).

    Must run before the dependency logs: faiss logs its probes when first imported, so the package's
    ``__init__`` calls it in every process that imports the package (the driver again through
    :func:`configure_output` once ``-v`` is known, Ray Train workers again when their loop starts, for
    Ray Train's report logger).
    """
    verbose = is_verbose()
    names = list(NOISY_LOGGERS)
    context = sys.modules.get(_RAY_TRAIN_CONTEXT_MODULE)
    if getattr(context, "__file__", None):
        names.append(context.__file__)
    for name in names:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    auth = logging.getLogger(_RAY_AUTH_LOGGER)
    for existing in [f for f in auth.filters if isinstance(f, _DropAuthEnabledNotice)]:
        auth.removeFilter(existing)
    if not verbose:
        auth.addFilter(_DropAuthEnabledNotice())


class _DropAuthEnabledNotice(logging.Filter):
    """Drops Ray's notice that it enabled token authentication (keeps the one saying it is disabled)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_RAY_AUTH_ENABLED_NOTICE)


def ray_train_log_level() -> str:
    """Level of Ray Train's own console lines (``ray.train.LoggingConfig``): INFO only with ``-v``."""
    return "INFO" if is_verbose() else "WARNING"


def filter_ray_worker_lines() -> None:
    """Drop Ray's constructor-argument line from the worker output Ray prints in this driver.

    Call after ``ray.init``: Ray's handler that prints worker lines (``log_to_driver``) is wrapped so
    that it skips lines containing :data:`RAY_CONSTRUCTOR_ARGS_LINE`. Relies on Ray 2.60's dispatcher
    of worker output (``ray._private.ray_logging``); without it, nothing changes.
    """
    if is_verbose():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    handlers = getattr(dispatcher, "handlers", None)
    lock = getattr(dispatcher, "_lock", None)
    if not isinstance(handlers, list) or lock is None:
        return
    with lock:
        dispatcher.handlers = [
            (name, _skip_noise(handle) if name == "ray_print_logs" else handle) for name, handle in handlers
        ]


def _skip_noise(handle: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """``handle`` for batches of worker lines, without the lines that are known noise."""
    if getattr(handle, "skips_retro_noise", False):
        return handle

    def handle_without_noise(data: dict[str, Any]) -> None:
        lines = data.get("lines") or []
        kept = [line for line in lines if RAY_CONSTRUCTOR_ARGS_LINE not in line]
        if kept or not lines:
            handle({**data, "lines": kept} if len(kept) != len(lines) else data)

    handle_without_noise.skips_retro_noise = True
    return handle_without_noise


def filter_native_stderr() -> None:
    """Drop Ray's constructor-argument line from what native code writes to this process's stderr.

    Ray's C++ core writes its errors to file descriptor 2, beside Python. Here fd 2 becomes a pipe into
    ``grep -v`` of :data:`RAY_CONSTRUCTOR_ARGS_LINE`, which writes every other line to the original
    stderr (and keeps doing so if this process dies, so a crash report is never lost), while Python's
    ``sys.stderr`` writes to the original stream directly: logging, tracebacks and progress bars do not
    pass through the filter, and a terminal stays a terminal. Without ``grep``, nothing changes.
    """
    grep = shutil.which("grep")
    if grep is None or sys.stderr is None or is_verbose():
        return
    sys.stderr.flush()
    original = os.dup(2)
    try:
        pump = subprocess.Popen(
            [grep, "-v", "-F", "--line-buffered", RAY_CONSTRUCTOR_ARGS_LINE],
            stdin=subprocess.PIPE,
            stdout=original,
            start_new_session=True,  # Ctrl-C stops the command, not its stderr
        )
    except OSError:
        os.close(original)
        return
    os.dup2(pump.stdin.fileno(), 2)
    pump.stdin.close()
    sys.stderr = open(  # noqa: SIM115 (the process's stderr from now on)
        original,
        "w",
        buffering=1,
        encoding=sys.stderr.encoding,
        errors=sys.stderr.errors,
        closefd=False,
    )

    def finish() -> None:
        """Close the pipe and let grep print the last lines before the shell prompt returns."""
        sys.stderr.flush()
        os.dup2(original, 2)
        # a child process may still hold the pipe: grep then ends with it
        with contextlib.suppress(subprocess.TimeoutExpired):
            pump.wait(timeout=5)

    atexit.register(finish)
