"""Stopping cleanly: SIGTERM (what cluster schedulers send before they kill a job) and SIGINT
(Ctrl-C) finish the current step, save the checkpoint and stop the run with `Interrupted`;
checkpoints are written under a temporary name and renamed, so a kill never leaves half of one.
"""

from __future__ import annotations

import re
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):  # noqa: N818 - what happened, not an error in the input
    """The run was stopped by a signal after saving its checkpoint; it can be resumed."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


class PrepInterrupted(Interrupted):
    """A signal before the first step (loading the model, building targets, sweeping the
    vocabulary, starting the loggers): no results or checkpoint of this attempt exist; the same
    command runs it again (resuming an earlier checkpoint where there is one)."""

    def __init__(self, signum: int, what: str):
        super().__init__(signum, 0, Path())
        self.args = (f"{signal.Signals(signum).name} while {what}, before the first step (the same command "
                     "runs it again)",)


@contextmanager
def handling(handler: Any):
    """`handler` for SIGTERM and SIGINT for the duration, the handlers before it back afterwards.
    Only the main thread may set handlers: elsewhere nothing changes."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in HANDLED}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def stop_at_once(what: str):
    """SIGTERM/SIGINT raise PrepInterrupted at once for the duration (work that writes no results:
    stopping in the middle loses nothing). Inner handlers (the demo SAE's, the fit's) take over
    while they are installed. Only the main thread may set handlers; elsewhere nothing changes."""

    def stop(signum: int, _frame: Any) -> None:
        raise PrepInterrupted(signum, what)

    with handling(stop):
        yield


# -- a launcher's jobs stop with it ------------------------------------------------------------------
PROCESS_LAUNCHERS = ("hydra/launcher=local",)  # launchers whose jobs are child processes of this one
JOBS_WAIT_S = 300.0  # how long the jobs get to save their checkpoints before they are killed


def stop_jobs(signum: int, wait_s: float = JOBS_WAIT_S) -> int:
    """Stop every descendant process (the launcher's jobs) and wait for them: SIGINT, which a job
    takes as "save the checkpoint and stop" during its fit and as KeyboardInterrupt before (a
    submitit job ignores SIGTERM: it is the cluster's preemption signal); the ones still alive
    after `wait_s` are killed. Returns how many there were."""
    import psutil

    jobs = psutil.Process().children(recursive=True)
    for job in jobs:
        try:
            job.send_signal(signal.SIGINT)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(jobs, timeout=wait_s)
    for job in alive:
        try:
            job.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return len(jobs)


@contextmanager
def jobs_stop_with_launcher(argv: list[str], wait_s: float = JOBS_WAIT_S):
    """Around a `--multirun` with a launcher whose jobs are processes (hydra/launcher=local): a
    SIGTERM to the launcher stops its jobs (each saves its checkpoint), waits for them and exits
    143 with one line; without this the jobs run on after the launcher is gone."""
    import sys
    import threading

    multirun = any(a in ("-m", "--multirun") for a in argv)
    if not multirun or not any(a in PROCESS_LAUNCHERS for a in argv) or \
            threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM while the jobs save: still waiting
        n = stop_jobs(signum, wait_s)
        print(f"interrupted: {signal.Signals(signum).name}: {n} job process(es) stopped, each with its checkpoint; "
              "run the same command again to resume them", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the command that resumes a run -----------------------------------------------------------------
BARE = re.compile(r"[A-Za-z0-9_/.\-]+")  # a Hydra value that needs no quotes (unless it reads as another type)
OTHER_TYPE = re.compile(r"[0-9.\-+eE_]+|true|false|null|[-+]?(nan|inf)", re.IGNORECASE)


def hydra_quoted(text: str) -> str:
    """`text` as a value of Hydra's override grammar that parses back to exactly `text`: bare where
    it can be, else single-quoted with the quotes (and the backslashes before them) escaped.
    Unquoted non-ASCII letters, spaces, commas or brackets do not parse."""
    if BARE.fullmatch(text) and not OTHER_TYPE.fullmatch(text):
        return text
    doubled = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + doubled.replace("'", "\\'") + "'"


def resume_command(module: str, overrides: list[str], run_dir: str | Path) -> str:
    """`python -m MODULE OVERRIDES... hydra.run.dir=RUN_DIR` for a shell: each word quoted for the
    shell, the run directory also for Hydra (the other overrides are as Hydra read them)."""
    import shlex

    words = [o for o in overrides if not o.lstrip("+").startswith("hydra.run.dir=")]
    words.append(f"hydra.run.dir={hydra_quoted(str(run_dir))}")
    return " ".join(["python", "-m", module, *(shlex.quote(w) for w in words)])


# -- commands that write their outputs at the end (export, report, static, examples, merge) ------------
class Stopped(BaseException):  # noqa: N818 - what happened, not an error in the input
    """SIGTERM/SIGINT during a command that writes its outputs whole at the end. A BaseException,
    like KeyboardInterrupt: no `except Exception` on its way turns it into an error, and the
    `finally` blocks of its writers remove their temporary files."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def stops_in_one_line(module: str):
    """Decorator for a command's `main(argv) -> int`: SIGTERM/SIGINT stop it at once (its writers
    leave nothing half-written), print one line (what stopped, that nothing was written, the command
    that runs it again) and return 128 + signum (143, 130). Further signals while it cleans up are
    ignored; the handlers before are restored. Elsewhere than the main thread nothing changes."""
    import functools
    import shlex
    import sys
    import threading

    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            if threading.current_thread() is not threading.main_thread():
                return main(argv)
            words = list(sys.argv[1:] if argv is None else argv)

            def stop(signum: int, _frame: Any) -> None:
                for s in HANDLED:
                    signal.signal(s, signal.SIG_IGN)  # the writers' cleanup runs to its end
                raise Stopped(signum)

            try:
                with handling(stop):
                    return main(argv)
            except Stopped as e:
                print(f"interrupted: {e} during python -m {module}: nothing was written; run it again with: "
                      f"python -m {module} {shlex.join(words)}".rstrip(), file=sys.stderr)
                return 128 + e.signum

        return run

    return wrap


def __getattr__(name: str) -> object:  # a name that moved to another module still imports (ft.core.moved)
    from ft.core.moved import moved_attribute

    return moved_attribute(__name__, name)
