"""One writer per run folder: an advisory lock the operating system releases.

A run takes ``fcntl.flock`` on ``<out>/.lock`` (exclusive, non-blocking) before it
touches anything in ``<out>`` (``--overwrite`` deletes files), and keeps it until the
run ends. The kernel drops the lock when the process exits, however it exits (SIGKILL
included), so a killed run never blocks its own ``--resume``; a second process that
wants the folder while the first is alive gets :class:`RunFolderBusy`, whose message
names the folder and the holder (its pid, host, start time and command line, which the
holder writes into the lock file).

Within one process the lock is re-entrant: a later run (or trainer) of the same process
on the same folder takes it over, as a script that trains, then resumes, expects. The
lock is advisory and local: processes on other hosts sharing a network file system may
not see it (``flock`` over NFS depends on the server).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import shlex
import socket
import sys
from pathlib import Path

from gcgd_jax.train.config import ConfigError

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock"]

#: The lock file inside a run folder.
LOCK_NAME = ".lock"

# folder (resolved) -> (the file descriptor this process holds, the RunLock that owns it,
# whether the lock created the folder)
_HELD: dict[Path, tuple[int, RunLock, bool]] = {}


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder's lock (``gcgd-train`` exits with 2)."""


class RunLock:
    """The lock of one run folder, taken on construction; :meth:`release` gives it back.

    Args:
        folder: the run folder (created if missing).

    Raises:
        RunFolderBusy: another process holds it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = self.folder.resolve()
        if self._key in _HELD:  # this process holds it already: take it over
            fd, _, created = _HELD[self._key]
            _HELD[self._key] = (fd, self, created)
            return
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunFolderBusy(
                f"output folder {self.folder} is in use by another run ({holder}); wait for "
                "it to finish, stop it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}: {command}"
        os.write(fd, (holder + "\n").encode())
        _HELD[self._key] = (fd, self, created)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (not released, not taken over)."""
        return self._key in _HELD and _HELD[self._key][1] is self

    def release(self) -> None:
        """Gives the lock back; a no-op when not :attr:`held`.

        The lock file stays, emptied (a folder's files are the same before and after a run
        that changed nothing in it); a folder this lock created, that holds nothing else
        (the run stopped before writing anything), is removed."""
        if not self.held:
            return
        fd, _, created = _HELD.pop(self._key)
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if created and [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
            (self.folder / LOCK_NAME).unlink()
            self.folder.rmdir()
