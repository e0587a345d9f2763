"""Caches for the slow parts of TextWorld's PDDL engine, which ALFWorld runs on.

`GroundingCache`: a disk cache for fast_downward's PDDL grounding, the slow part of a reset.

TextWorld's `PddlState` calls `fast_downward.pddl2sas(domain, problem, optimize=...)`
twice per construction, and an ALFWorld reset constructs it twice (once in `load`, once
in `reset`), so every reset grounds the same game four times. The result depends only on
the PDDL text and the engine versions, so it is cached here, per (domain, problem,
optimize), as a zlib-compressed pickle of the `(task, sas)` pair that `pddl2sas` returns.

The cache is hooked in with `GroundingCache.installed()`, which swaps
`fast_downward.pddl2sas` only for the duration of a `with` block (the env wraps its own
`load`/`reset` calls in it), so no other user of fast_downward sees the cache.

Several worker processes may share one cache folder: entries are written to a temporary
file in the same folder and then renamed into place (`files.write_atomically`), so a reader
sees either no entry or a whole one.

`ParseMemo`: the engine's text generation re-parses the same few hundred grammar snippets
and logic queries with TatSu on every step and reset (about half of a step's time). The
parse is a pure function of the snippet, so it is memoised in memory, handing out deep
copies because the engine mutates what it gets. It is installed the same scoped way.

Both swap module attributes while installed, so, like the envs, they are not thread-safe:
one env per process (or per thread that never overlaps another's engine calls).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import pickle
import sys
import zlib
from typing import Any, Iterator

import fast_downward
import fast_downward.interface
import textworld.envs.pddl.textgen
import textworld.logic

from sage_opd_jax import files

# Bump when the pickled layout or the key recipe changes.
_FORMAT_VERSION = 2
# The SAS text compresses ~8x at a millisecond's cost: ~110 KB per game instead of ~800 KB.
_ZLIB_LEVEL = 3
# The reset right after a load grounds the same problem again; keeping the last few
# entries' bytes in memory serves those without touching the disk.
_MEMORY_ENTRIES = 4


def _engine_versions() -> tuple[str, ...]:
  """The versions that the pickled grounding depends on (its classes and its algorithm)."""
  return (
    f"format={_FORMAT_VERSION}",
    f"fast_downward_textworld={importlib.metadata.version('fast_downward_textworld')}",
    f"textworld={importlib.metadata.version('textworld')}",
    f"python={sys.version_info.major}.{sys.version_info.minor}",
  )


def _loads(blob: bytes) -> Any:
  return pickle.loads(zlib.decompress(blob))


def default_cache_dir() -> pathlib.Path:
  """`$XDG_CACHE_HOME/sage_opd_jax/alfworld_grounding` (or under `~/.cache`)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "sage_opd_jax" / "alfworld_grounding"


class GroundingCache:
  """Caches `fast_downward.pddl2sas` results on disk, keyed by content and versions."""

  def __init__(self, cache_dir: str | os.PathLike[str] | None = None):
    # Created on the first write, so an env that never resets leaves no trace.
    self.cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    self._versions = _engine_versions()
    self._memory: collections.OrderedDict[str, bytes] = collections.OrderedDict()
    # Counters for benchmarks and tests: where each `pddl2sas` call was answered from.
    self.memory_hits = 0
    self.disk_hits = 0
    self.misses = 0

  def key(self, domain: str, problem: str, optimize: bool) -> str:
    """The entry name: a SHA-256 of the grounding's inputs and the engine versions."""
    digest = hashlib.sha256()
    for part in (*self._versions, f"optimize={bool(optimize)}", domain, problem):
      encoded = part.encode("utf-8")
      # Length-prefixed, so that no two different input tuples hash the same bytes.
      digest.update(len(encoded).to_bytes(8, "little"))
      digest.update(encoded)
    return digest.hexdigest()

  def path(self, key: str) -> pathlib.Path:
    return self.cache_dir / f"{key}.pkl"

  def pddl2sas(
    self, domain: str, problem: str, verbose: bool = False, optimize: bool = False
  ) -> tuple[Any, str]:
    """Drop-in for `fast_downward.pddl2sas`: returns a fresh `(task, sas)` pair."""
    key = self.key(domain, problem, optimize)
    blob = self._memory.get(key)
    if blob is not None:
      self._memory.move_to_end(key)
      self.memory_hits += 1
      return _loads(blob)

    path = self.path(key)
    blob, result = self._read(path)
    if blob is not None:
      self.disk_hits += 1
    else:
      self.misses += 1
      result = fast_downward.interface.pddl2sas(domain, problem, verbose=verbose, optimize=optimize)
      blob = zlib.compress(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL), _ZLIB_LEVEL)
      self._write(path, blob)
      # Hand out an unpickled copy, as on a hit, so that a caller that mutates the task
      # behaves the same whether or not the entry existed.
      result = _loads(blob)

    self._memory[key] = blob
    while len(self._memory) > _MEMORY_ENTRIES:
      self._memory.popitem(last=False)
    return result

  def _read(self, path: pathlib.Path) -> tuple[bytes | None, Any]:
    """Returns `(blob, unpickled)` for an entry, or `(None, None)` when there is none."""
    try:
      blob = path.read_bytes()
    except FileNotFoundError:
      return None, None
    try:
      return blob, _loads(blob)
    except Exception as e:  # pylint: disable=broad-except
      # Entries are replaced atomically, so this is a foreign or truncated file (a full
      # disk, a copy): regrounding and overwriting it is correct, and it is logged.
      logging.warning("Unreadable grounding cache entry %s (%r); regrounding the game.", path, e)
      return None, None

  def _write(self, path: pathlib.Path, blob: bytes) -> None:
    self.cache_dir.mkdir(parents=True, exist_ok=True)
    files.write_atomically(path, blob)

  @contextlib.contextmanager
  def installed(self) -> Iterator[None]:
    """Routes `fast_downward.pddl2sas` through this cache inside the block only."""
    previous = fast_downward.pddl2sas
    fast_downward.pddl2sas = self.pddl2sas
    try:
      yield
    finally:
      fast_downward.pddl2sas = previous


class ParseMemo:
  """Memoises TextWorld's two TatSu snippet parsers (text grammar and logic queries)."""

  # The modules whose `_parse_and_convert` the engine calls per derived text and query.
  _MODULES = (textworld.envs.pddl.textgen, textworld.logic)

  def __init__(self, max_entries: int = 8192):
    self.max_entries = max_entries
    # pylint: disable-next=protected-access
    self._originals = {module: module._parse_and_convert for module in self._MODULES}
    self._memo: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
    self.hits = 0
    self.misses = 0

  def _memoised(self, module: Any) -> Any:
    original = self._originals[module]

    def parse_and_convert(*args: Any, **kwargs: Any) -> Any:
      key = (module.__name__, args, tuple(sorted(kwargs.items())))
      parsed = self._memo.get(key)
      if parsed is None:
        self.misses += 1
        parsed = original(*args, **kwargs)
        self._memo[key] = parsed
        while len(self._memo) > self.max_entries:
          self._memo.popitem(last=False)
      else:
        self.hits += 1
        self._memo.move_to_end(key)
      # The engine sets contexts on the symbols it gets; the memoised parse stays pristine.
      return copy.deepcopy(parsed)

    return parse_and_convert

  @contextlib.contextmanager
  def installed(self) -> Iterator[None]:
    """Routes the engine's snippet parsing through this memo inside the block only."""
    # pylint: disable-next=protected-access
    previous = {module: module._parse_and_convert for module in self._MODULES}
    for module in self._MODULES:
      module._parse_and_convert = self._memoised(module)  # pylint: disable=protected-access
    try:
      yield
    finally:
      for module, function in previous.items():
        module._parse_and_convert = function  # pylint: disable=protected-access
