"""Process-level safety of the ``slimdiff`` command: output lock, atomic output folder, signals, quiet console.

* :class:`OutputLock`: an OS lock (``fcntl.flock``; ``msvcrt.locking`` on Windows) on a hidden lock file next
  to ``--out``, so a second run on the same output refuses at once. The kernel releases it when a run dies, even
  by SIGKILL, so a crashed run never blocks the next one.
* :class:`AtomicFolder`: the output is built in a hidden temporary folder next to ``--out`` and moved into
  place only when complete; any exception, Ctrl-C or SIGTERM removes it. Folders get the umask's permissions.
* :func:`signals_as_exceptions`: SIGTERM raises :class:`Terminated` (SIGINT raises ``KeyboardInterrupt``), so
  cleanup runs in ``finally``/``__exit__`` and the command exits 143 / 130 without a traceback.
* :class:`QuietConsole`: third-party notices (diffusers, transformers, huggingface_hub, Python warnings) and
  their loading/saving progress bars are kept off the console and written to the run's log file
  (``slimdiff.log`` in the output folder); ``--verbose`` shows them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .core.io_utils import current_umask

logger = logging.getLogger("slimdiff")

EXIT_SIGINT = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command
EXIT_SIGTERM = 143  # 128 + SIGTERM
TMP_MARK = "slimdiff-tmp"


class CLIError(Exception):
    """An error the user can act on: printed as one line without a traceback, exit code 2."""


class Terminated(BaseException):
    """SIGTERM arrived (e.g. a scheduler's time limit). A BaseException, like ``KeyboardInterrupt``, so that
    ``except Exception`` blocks in libraries do not swallow it."""


# --------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------


class SignalState:
    """Which stop signal arrived, if any. Libraries sometimes catch the exception a signal raises and re-raise
    another one (diffusers turns any error while reading weights into an ``OSError``); the command still knows
    it was stopped, and exits 130 / 143."""

    def __init__(self):
        self.received: int | None = None

    def handler(self, signum, frame):
        self.received = signum
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    @property
    def exit_code(self) -> int | None:
        if self.received is None:
            return None
        return EXIT_SIGINT if self.received == signal.SIGINT else EXIT_SIGTERM


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[SignalState]:
    """SIGTERM raises :class:`Terminated`, SIGINT ``KeyboardInterrupt`` (unless SIGINT is ignored, as for a
    background job), both recorded in the yielded :class:`SignalState`. Main thread only; restored on exit."""
    state = SignalState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, state.handler)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, state.handler)
    try:
        yield state
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while a cleanup or a commit runs; a signal that came meanwhile is delivered
    (and raises) right after, so neither is cut in half."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# --------------------------------------------------------------------------------------------------
# Output lock
# --------------------------------------------------------------------------------------------------


class OutputLock:
    """Exclusive lock on an output path for one run (a lock file ``.NAME.slimdiff.lock`` next to it)."""

    def __init__(self, target: Path):
        self.target = target
        self.path = target.parent / f".{target.name}.slimdiff.lock"
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CLIError(f"cannot write to {self.target.parent}: {exc.strerror or exc}") from exc
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise CLIError(f"cannot write to {self.target.parent}: {exc.strerror or exc}") from exc
            if not _try_lock(fd):
                holder = _read_pid(fd)
                os.close(fd)
                raise CLIError(f"{self.target} is being written by another slimdiff run"
                               f"{f' (pid {holder})' if holder else ''}; wait for it to finish or choose another --out")
            # The previous holder unlinks the lock file when it finishes: if it did so after we opened it, we
            # hold a lock on a file nobody else will see. Retry on the new file then.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: a waiting run then retries on a fresh file
        os.close(self._fd)  # releases the lock
        self._fd = None


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode().strip()
        return text if text.isdigit() else ""
    return ""


# --------------------------------------------------------------------------------------------------
# Atomic output folder
# --------------------------------------------------------------------------------------------------


class AtomicFolder:
    """Build a folder next to ``target`` and move it into place only when everything was written.

    Hold an :class:`OutputLock` on ``target`` around it: temporary folders of earlier runs that were killed
    (SIGKILL, power loss) are then known to be abandoned and are removed.
    """

    def __init__(self, target: Path, overwrite: bool):
        self.target = target
        if target.is_file() or (target.exists() and not target.is_dir()):
            raise CLIError(f"--out {target} is a file; --out names the output folder: choose another path")
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise CLIError(f"output folder {target} exists and is not empty; pass --overwrite or choose another --out")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            for stale in target.parent.glob(f".{target.name}.{TMP_MARK}.*"):
                shutil.rmtree(stale, ignore_errors=True)
                logger.warning("removed %s, left behind by an interrupted run", stale)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{TMP_MARK}.", dir=target.parent))
            os.chmod(self.tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
        except OSError as exc:
            raise CLIError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        with deferred_signals():
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            normal_permissions(self.tmp)
            backup = None
            if self.target.exists():
                backup = self.target.with_name(f".{self.target.name}.{TMP_MARK}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(self.target, backup)
            os.replace(self.tmp, self.target)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)


def normal_permissions(root: Path) -> None:
    """Give every folder and file under ``root`` the permissions of a normally created one (``0o777`` / ``0o666``
    minus the umask): ``mkdtemp`` makes folders private, and safetensors (0.8) writes its files with ``0o600``."""
    mask = current_umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


# --------------------------------------------------------------------------------------------------
# Quiet console
# --------------------------------------------------------------------------------------------------

# torchao logs "Failed to load <kernel>.so" and torch (through torchao's registrations) deprecation notices at import
# time, when a Flux or SD3 pipeline makes diffusers import its torchao quantizer.
THIRD_PARTY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "accelerate", "torch", "torchao", "py.warnings")


def _is_console_handler(handler: logging.Handler) -> bool:
    """A library's own handler that prints to a stream, i.e. the terminal (torch installs one on its "torch"
    logger). File handlers (a subclass) are left alone."""
    return type(handler) is logging.StreamHandler


class RunLog(logging.Handler):
    """Keeps log records in memory until :meth:`attach` names the run's log file, then writes them there."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.buffer: list[str] = []
        self.file = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a malformed third-party record must not break the run
            return
        if self.file is None:
            self.buffer.append(line)
        else:
            self.file.write(line + "\n")
            self.file.flush()

    def attach(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.file.write("".join(line + "\n" for line in self.buffer))
        self.file.flush()
        self.buffer.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


class QuietConsole:
    """For the duration of a command: our messages on the console (``slimdiff: ...``), everything else in the
    run log. Restores every logger, progress-bar and warnings setting it changed (``main`` may run in-process)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.log = RunLog()
        self.console = logging.StreamHandler(sys.stderr)
        self.console.setFormatter(logging.Formatter("slimdiff: %(message)s"))
        self.console.setLevel(logging.INFO if verbose else logging.WARNING)
        self._restore: list = []

    def __enter__(self) -> QuietConsole:
        ours = logging.getLogger("slimdiff")
        self._save_logger(ours)
        ours.setLevel(logging.INFO)
        ours.propagate = False
        ours.addHandler(self.console)
        ours.addHandler(self.log)
        self._quiet_libraries()
        for name in THIRD_PARTY_LOGGERS:
            lib = logging.getLogger(name)
            self._save_logger(lib)
            lib.propagate = False
            lib.handlers[:] = [h for h in lib.handlers if not _is_console_handler(h)]  # restored on exit
            lib.addHandler(self.log)
            if self.verbose:
                lib.addHandler(self.console)
        logging.captureWarnings(True)
        self._restore.append(lambda: logging.captureWarnings(False))
        return self

    def __exit__(self, *exc_info) -> None:
        for undo in reversed(self._restore):
            with contextlib.suppress(Exception):
                undo()
        self._restore.clear()
        self.log.close()

    def _save_logger(self, lg: logging.Logger) -> None:
        handlers, level, propagate = list(lg.handlers), lg.level, lg.propagate

        def undo():
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        self._restore.append(undo)

    def _quiet_libraries(self) -> None:
        """diffusers and transformers print through their own default handlers and tqdm bars: switch those off
        (their records then reach our handlers). Download bars of huggingface_hub stay: they show real progress."""
        for module in ("diffusers.utils.logging", "transformers.utils.logging"):
            try:
                lib = __import__(module, fromlist=["_"])
            except Exception:  # an optional library that is missing or broken: nothing to quieten
                continue
            lib.get_verbosity()  # configures the library's root logger (adds its default handler) if not yet done
            root = logging.getLogger(module.split(".")[0])
            default = getattr(lib, "_default_handler", None)
            had_default = default is not None and default in root.handlers
            bars = lib.is_progress_bar_enabled()
            lib.disable_progress_bar()
            if had_default:
                root.removeHandler(default)

            def undo(lib=lib, root=root, default=default, had_default=had_default, bars=bars):
                if bars:
                    lib.enable_progress_bar()
                if had_default and default not in root.handlers:
                    root.addHandler(default)
            self._restore.append(undo)
