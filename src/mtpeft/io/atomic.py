"""Atomic folder writes: a crash leaves the old folder or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_dir(path: str | os.PathLike, write: Any) -> Path:
    """Write a folder atomically: ``write(tmp_dir)`` fills a sibling temp folder that then replaces ``path``.

    A crash leaves either the old folder or the new one, never a mix; the temp folder name starts with a dot.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
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
