"""Writing a file whole: a reader, or another process writing the same file, sees the old content or the new."""

from __future__ import annotations

import os
import pathlib
import tempfile

# The process's umask, read once at import (reading it means setting it): the mode a plain open() gives.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomically(path: str | os.PathLike[str], data: str | bytes) -> None:
  """Writes `data` (text as UTF-8) to a temporary file of its own beside `path` (`.tmp-<name>-*.tmp`), then
  renames it onto `path`. A fixed temporary name would let two processes writing one file rename each other's.
  The file gets the mode open() would give it (mkstemp's own is 0600: a shared workdir's reports would be
  unreadable to the rest of the group)."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-", suffix=".tmp")
  try:
    os.chmod(tmp, 0o666 & ~_UMASK)
    with (os.fdopen(fd, "wb") if isinstance(data, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
