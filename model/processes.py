"""Processes of a training run: its process tree, and a rank that must not outlive its job.

torchrun's elastic agent starts every rank in a session of its own (start_new_session), so
neither killing torchrun's process group nor the death of the job that started torchrun ends
the ranks.  Linux /proc tells a process's parent and start time; elsewhere only what
``os.kill`` can tell is used.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...; the starttime is
    index 19), or None when the process is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()      # the name may hold spaces and ')'
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """The pids below ``root`` in the process tree (empty where there is no /proc)."""
    try:
        entries = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []
    children: dict[int, list[int]] = {}
    for pid in entries:
        fields = stat_fields(pid)
        if fields is not None:                                 # None: gone meanwhile
            children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_process_tree(root: int) -> None:
    """SIGKILL the process group of ``root`` and of each of its descendants, and each process itself.

    The descendants are found before anything is killed: a killed parent's children are handed
    to init and no longer found.
    """
    for pid in [root, *descendants(root)]:
        for kill in (os.killpg, os.kill):          # its group (a rank's DataLoader workers), itself
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def exit_with(pid: int, *, period: float = 2.0) -> None:
    """End this process (exit status 1) once process ``pid`` has ended, from a daemon thread that
    looks every ``period`` seconds; a pid reused by another process counts as ended (Linux: its
    start time differs)."""
    started = _start_time(pid)
    if started is None:
        raise SystemExit(f"--exit-with-pid: no process {pid}")

    def watch():
        while _start_time(pid) == started:
            time.sleep(period)
        print(f"process {pid}, which started this one, has ended: exiting", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-pid", daemon=True).start()


def _start_time(pid: int):
    """The start time of process ``pid`` (/proc), True where there is no /proc, None once it is gone."""
    if os.path.isdir("/proc"):
        fields = stat_fields(pid)
        return None if fields is None else int(fields[19])
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return None
    except PermissionError:
        return True
