"""Files written whole or not at all."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, durable: bool = True) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``.

    A reader sees the old file or the new one, never half of it; a failure (an exception, a
    full disk) leaves no temporary file behind.  ``durable`` also flushes the data to the disk
    before the rename, so that a machine crash cannot leave an empty file under the name
    (worth it for checkpoints and results; not for many small cache files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
