"""Issue 15: the `slimdiff` command under bad inputs, signals, concurrent runs and a crashed run.

The signal and concurrency tests run the real command in a subprocess on the embedded model and send real
signals; they stop it early, so its full length does not matter.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slimdiff_diffusers.cli as cli
from slimdiff_diffusers.cli import main
from slimdiff_diffusers.cli_runtime import TMP_MARK, AtomicFolder, OutputLock

ROOT = Path(__file__).resolve().parents[1]
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---- input errors: one line, exit 2, nothing written ---------------------------------------------------


def test_out_naming_an_existing_file(tmp_path, capsys):
    target = tmp_path / "result"
    target.write_text("keep me")
    assert main(["slim", "--out", str(target)]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and "is a file" in lines[0] and "Traceback" not in lines[0]
    assert target.read_text() == "keep me"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["calibrate", "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"\xff\xfe\x00a\x00 \x00c\x00a\x00t", bytes(range(256)), b"a cat\x00\x01\x02"])
def test_binary_prompt_file(tmp_path, capsys, content):
    prompts = tmp_path / "prompts.bin"
    prompts.write_bytes(content)
    assert main(["slim", "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    lines = _err_lines(capsys)
    assert len(lines) == 1 and "not UTF-8 text" in lines[0] and str(prompts) in lines[0]
    assert not (tmp_path / "o").exists()


def test_missing_local_folders_are_not_hub_ids(tmp_path, capsys, monkeypatch):
    """Before: 'models/mine' (one slash) was tried on the Hub and reported as a Hub id problem."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("models/mine", "./x", "x", "a/b/c", str(tmp_path / "absent")):
        assert main(["slim", name, "--out", str(tmp_path / "o")]) == 2, name
        lines = _err_lines(capsys)
        assert len(lines) == 1 and "model folder not found" in lines[0], (name, lines)
        assert "Hub" not in lines[0]
    assert cli.resolve_model("someone/model") == "someone/model"  # a plausible repo id stays a Hub id


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line of a long library message")
    monkeypatch.setattr(cli, "load_pipeline", broken)
    assert main(["slim", "--out", str(tmp_path / "o")]) == 1
    lines = _err_lines(capsys)
    assert lines == ["slimdiff: error: unexpected RuntimeError: boom second line of a long library message "
                     "(rerun with --debug for the traceback and report it if it looks like a bug)"]
    assert main(["slim", "--debug", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert main(["--debug", "slim", "--out", str(tmp_path / "o")]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "the temporary folder and the lock are gone"


def test_a_held_lock_refuses_at_once(tmp_path, capsys):
    out = tmp_path / "o"
    with OutputLock(out):
        started = time.perf_counter()
        assert main(["slim", "--out", str(out)]) == 2
        assert time.perf_counter() - started < 5
        err = capsys.readouterr().err
        assert "being written by another slimdiff run" in err and f"pid {os.getpid()}" in err
    assert not (tmp_path / ".o.slimdiff.lock").exists()
    with OutputLock(out):  # released and reusable
        pass


def test_output_folder_gets_umask_permissions_and_stale_temporaries_go(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o"
        stale = tmp_path / f".o.{TMP_MARK}.dead1234"
        stale.mkdir()
        (stale / "half.safetensors").write_bytes(b"x")
        with OutputLock(out), AtomicFolder(out, overwrite=False) as tmp:
            assert stat.S_IMODE(tmp.stat().st_mode) == 0o755  # before: mkdtemp's 0o700
            assert not stale.exists()
            from slimdiff_diffusers.core.io_utils import atomic_path

            with atomic_path(tmp / "file.json") as f:
                f.write_text("{}")
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert stat.S_IMODE((out / "file.json").stat().st_mode) == 0o644  # before: mkstemp's 0o600
    finally:
        os.umask(old)


# ---- real processes: signals, concurrency, a crashed run -----------------------------------------------


def _start(out: Path, *extra: str) -> subprocess.Popen:
    """The main job on the embedded model at its default size (long enough to be stopped midway)."""
    def child_setup():  # a background shell may start us with SIGINT ignored; a user's terminal does not
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "slimdiff_diffusers.cli", "slim", "--out", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=child_setup)


def _wait_for_temporary(out: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(out.parent.glob(f".{out.name}.{TMP_MARK}.*"))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.returncode} {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the run never created its temporary folder")


@POSIX
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_signal_cleans_up_and_exits(tmp_path, signum, code, word):
    out = tmp_path / "slim-out"
    proc = _start(out)
    try:
        _wait_for_temporary(out, proc)
        time.sleep(0.5)  # let it get into loading / calibration
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert word in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no temporary folder, no lock file, no partial output"


@POSIX
def test_concurrent_runs_one_refuses_and_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "slim-out"
    first = _start(out)
    try:
        stale = _wait_for_temporary(out, first)
        started = time.perf_counter()
        second = subprocess.run([sys.executable, "-m", "slimdiff_diffusers.cli", "slim", "--out", str(out)],
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                                text=True, timeout=300)
        refused_after = time.perf_counter() - started
        assert second.returncode == 2, second.stderr[-2000:]
        assert "being written by another slimdiff run" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run goes on"
        # A run that dies without cleaning up (SIGKILL, power loss) leaves its temporary folder and lock file...
        first.kill()
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert stale.exists() and (tmp_path / ".slim-out.slimdiff.lock").exists()
    # ...and does not block the next run: the kernel released its lock; the abandoned folder is removed.
    with OutputLock(out), AtomicFolder(out, overwrite=False):
        assert not stale.exists()
    print(f"second run refused after {refused_after:.1f}s (interpreter start included)")


@POSIX
def test_main_job_console_is_quiet_and_notices_go_to_the_log(tmp_path):
    """Before: ~11 lines of torchvision / accelerate / float32-cast notices and loading bars on the console."""
    out = tmp_path / "slim-out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        ["bash", "-c", f"umask 022 && exec {sys.executable} -m slimdiff_diffusers.cli slim --num-prompts 2 --steps 2 "
                       f"--num-eval-prompts 1 --batch-size 2 --out {out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    for notice in ("accelerate", "torchvision", "should be kept in float32", "Loading pipeline components",
                   "Loading weights", "Writing model shards", "[transformers]"):
        assert notice not in console, notice
    assert "SlimDiff: embedded default model" in result.stdout and "written to" in result.stdout
    log = (out / "slimdiff.log").read_text()
    assert "slimdiff: SlimSet" in log
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        assert "accelerate" in log  # the notice was kept, in the log
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "report.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim-out"]


def test_import_time_notices_of_torch_and_torchao_go_to_the_log(capfd):
    """Before: `slimdiff slim flux-tiny` printed torchao's "Failed to load <kernel>.so" lines and torch's
    Enum-registration deprecation notices (emitted through torch's own stderr handler) on the console."""
    import torch  # noqa: F401  (installs torch's own console handler on the "torch" logger)

    from slimdiff_diffusers.cli_runtime import QuietConsole

    torch_logger = logging.getLogger("torch")
    before = list(torch_logger.handlers)
    with QuietConsole(verbose=False) as console:
        logging.getLogger("torchao").warning("Failed to load kernel.so")
        logging.getLogger("torch.utils._pytree").warning("is an Enum subclass")
        logging.getLogger("slimdiff").warning("ours")
    captured = capfd.readouterr()
    assert "Failed to load" not in captured.err + captured.out and "Enum subclass" not in captured.err + captured.out
    assert "slimdiff: ours" in captured.err
    kept = "\n".join(console.log.buffer)
    assert "Failed to load kernel.so" in kept and "is an Enum subclass" in kept
    assert torch_logger.handlers == before  # torch's handler is back after the command


def test_signal_handlers_are_restored_after_main(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(SystemExit):
        main(["slim", "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "missing.txt")])
    assert signal.getsignal(signal.SIGTERM) == before
