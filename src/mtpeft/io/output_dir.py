"""Output folders: whose they are, which process writes one now, and what a killed write left behind.

The rule (git's and Hugging Face's convention): mtpeft writes into a folder that is missing, empty, or an mtpeft
output of the same kind (a run folder, a PEFT export, a merged export). Any other non-empty folder is refused,
naming it, unless the caller passes ``overwrite``; even then only the entries mtpeft itself writes are replaced,
never the user's other files (:func:`~mtpeft.io.atomic.atomic_write_dir` keeps them).

A run folder being trained holds :data:`LOCK_NAME` (PID, host, start time), created exclusively; a lock whose
holder is dead on this host (a SIGKILL) is taken over with a note.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from ..errors import OutputFolderError, RunLockedError

__all__ = ["EXPORT_REPORT", "LOCK_NAME", "RUN_MARKER", "acquire_run_lock", "check_export_folder",
           "check_output_folder", "clean_orphan_writes", "export_kind", "is_run_folder", "release_run_lock"]

#: Written into every run folder when training starts: marks the folder as mtpeft's.
RUN_MARKER = "mtpeft_run.json"
#: The lock file of a run folder while ``mtpeft train`` writes it.
LOCK_NAME = ".mtpeft.lock"
#: The report every ``mtpeft export`` writes beside its files (``format``: ``peft`` when absent, or ``merged``).
EXPORT_REPORT = "mtpeft_export.json"

# Hidden folders a killed atomic write leaves: ".NAME.tmp-XXXXXXXX" (tempfile.mkdtemp's 8 characters) and
# ".NAME.old-PID"; only these exact shapes, for the names mtpeft writes, are ever removed.
_TMP = r"\.(?P<name>{names})\.tmp-[a-z0-9_]{{8}}"
_OLD = r"\.(?P<name>{names})\.old-\d+"
_RUN_WRITES = r"adapter"
_CHECKPOINT_WRITES = r"step-\d{7}"


def _entries(folder: Path) -> list[str]:
    """The folder's entries, without a run lock (a run that has just started owns the folder)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(LOCK_NAME))


def _not_a_folder(path: Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{what} {path} is a file, not a folder: choose another {what}")


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run folder written by ``mtpeft train`` (marked, or a run_config.yaml with the
    checkpoints, adapter or metrics log of a run from an mtpeft before the marker)."""
    p = Path(path)
    legacy = (p / "checkpoints").is_dir() or (p / "adapter").is_dir() or (p / "metrics.jsonl").is_file()
    return (p / RUN_MARKER).is_file() or ((p / "run_config.yaml").is_file() and legacy)


def check_output_folder(path: str | os.PathLike, *, overwrite: bool, what: str = "output_dir") -> None:
    """Refuse to train into ``path`` when it is a file, or a non-empty folder that is not a run folder (unless
    ``overwrite``: then mtpeft's own entries are written there and every other file is kept)."""
    p = Path(path)
    _not_a_folder(p, what)
    if not p.is_dir() or overwrite or is_run_folder(p):
        return
    found = _entries(p)
    if found:
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise OutputFolderError(f"{what} {p} is not empty and is not an mtpeft run folder (it holds {shown}); "
                                f"choose another {what}, or pass --overwrite to write the run there (mtpeft then "
                                f"replaces only its own files and keeps the others)")


def export_kind(path: str | os.PathLike) -> str | None:
    """``'peft'`` or ``'merged'`` for a folder ``mtpeft export`` wrote, else None."""
    report = Path(path) / EXPORT_REPORT
    if not report.is_file():
        return None
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    return str(data.get("format", "peft")) if isinstance(data, dict) else None


def check_export_folder(out: str | os.PathLike, kind: str, source_run: str | os.PathLike, *,
                        overwrite: bool) -> None:
    """Refuse an export folder that is the source run, inside it or around it; a file; or a non-empty folder that
    is not an export of the same ``kind`` (unless ``overwrite``; the folder's other files are kept)."""
    o, run = Path(out).resolve(), Path(source_run).resolve()
    if o == run or run in o.parents or o in run.parents:
        where = "is" if o == run else "is inside" if run in o.parents else "contains"
        raise OutputFolderError(f"--out {out} {where} the run folder {source_run}: an export must not write into "
                                f"its own run; choose a folder outside it")
    _not_a_folder(o, "--out")
    if not o.is_dir() or overwrite or export_kind(o) == kind:
        return
    found = _entries(o)
    if found:
        other = export_kind(o)
        what = f"a {other} export, not a {kind} one" if other else "not an mtpeft export"
        shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise OutputFolderError(f"--out {out} is not empty and is {what} (it holds {shown}); choose another "
                                f"folder, or pass --overwrite (mtpeft then replaces only its own files)")


def clean_orphan_writes(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporary folders that a killed atomic write left in a run folder and its checkpoints
    (only mtpeft's exact names); returns what was removed. Call it while holding the run's lock."""
    removed = []
    run = Path(run_dir)
    for folder, names in ((run, _RUN_WRITES), (run / "checkpoints", _CHECKPOINT_WRITES)):
        if not folder.is_dir():
            continue
        tmp, old = re.compile(_TMP.format(names=names)), re.compile(_OLD.format(names=names))
        for entry in folder.iterdir():
            m = tmp.fullmatch(entry.name) or old.fullmatch(entry.name)
            # an ".old-PID" folder is the only copy when the swap was cut between its two renames: kept then
            stale = m is not None and (m.re is tmp or (folder / m.group("name")).exists())
            if stale and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if removed:
        print(f"note: removed {len(removed)} unfinished write(s) of a killed run: "
              f"{', '.join(p.name for p in removed)}", file=sys.stderr)
    return removed


# --- the run lock -------------------------------------------------------------------------------------
def _holder(lock: Path) -> dict | None:
    try:
        data = json.loads(lock.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # a killed child its parent has not reaped yet still answers signal 0
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def acquire_run_lock(run_dir: str | os.PathLike) -> Path:
    """Create ``run_dir/.mtpeft.lock`` exclusively for this process; returns its path.

    Raises:
        RunLockedError: a live process (or one on another host) holds it; the message names its PID and host.
        OutputFolderError: the folder cannot be written (read-only, full).
    """
    run = Path(run_dir)
    lock = run / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    draft = run / f"{LOCK_NAME}.{os.getpid()}.tmp"
    try:
        draft.write_text(json.dumps(me))
        for _ in range(3):
            try:
                os.link(draft, lock)  # atomic and exclusive: the lock appears whole, or not at all
                return lock
            except FileExistsError:
                pass
            try:
                holder = _holder(lock)
            except FileNotFoundError:
                continue  # released meanwhile
            if holder is None:
                raise RunLockedError(f"{lock} exists but is unreadable: if no `mtpeft train` writes {run}, delete "
                                     f"it and start again")
            ours = holder.get("host") == me["host"]
            if ours and (holder["pid"] == me["pid"] or not _alive(holder["pid"])):
                print(f"note: taking over the lock of {run} from PID {holder['pid']}, which is no longer running",
                      file=sys.stderr)
                lock.unlink(missing_ok=True)
                continue
            raise RunLockedError(f"{run} is being trained by PID {holder['pid']} on {holder.get('host')} (since "
                                 f"{holder.get('started')}; lock file {lock}): wait for it to finish, or choose "
                                 f"another output_dir")
        raise RunLockedError(f"could not take the lock {lock}: another process keeps taking it")
    except OSError as exc:
        raise OutputFolderError(f"cannot write into output_dir {run}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            draft.unlink(missing_ok=True)


def release_run_lock(run_dir: str | os.PathLike) -> None:
    """Remove the run folder's lock if this process holds it (a no-op otherwise)."""
    lock = Path(run_dir) / LOCK_NAME
    try:
        holder = _holder(lock)
    except FileNotFoundError:
        return
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)
