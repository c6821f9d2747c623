"""Atomic folder writes: a crash leaves the old folder or the new one, never a mix; a user's other files survive."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link every entry of ``old`` that the new content does not write into ``new``, so that the files a user
    keeps in the folder survive the swap (the originals stay in place until the swap succeeds)."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def atomic_write_dir(path: str | os.PathLike, write: Any) -> Path:
    """Write a folder atomically: ``write(tmp_dir)`` fills a sibling temp folder that then replaces ``path``.

    A crash leaves either the old folder or the new one, never a mix; the temp folder name starts with a dot
    (``.NAME.tmp-XXXXXXXX``). Entries of an existing ``path`` that ``write`` does not write (a user's own files)
    are kept. A failed write (a full disk: safetensors' ``SafetensorError`` too) raises ``OSError``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        try:
            write(tmp)
        except SafetensorError as exc:  # not an OSError, though a full disk or a lost permission causes it
            raise OSError(f"could not write {path}: {exc}") from exc
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            _carry_over(path, tmp)
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
