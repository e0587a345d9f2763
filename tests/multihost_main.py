"""`python -m sage_opd_jax.main` for the multi-host test, with every process writing JAX's compilation cache.

JAX writes persistent-cache entries from process 0 only (`jax._src.compiler._cache_write`), which
spares a shared filesystem concurrent writes of one key. On CPU a key also hashes the topology of
the process's own devices (and a program's device assignment, which differs between the processes'
local decodes), so no two processes share a key, and the other processes' programs were never
written: each relaunch compiled them all again. Here each process writes its own entries, so a
relaunch loads what the killed launch compiled on every process. Nothing else changes: the CLI
and its flags are `sage_opd_jax.main`'s.
"""

import sys

from absl import app
from jax._src import compilation_cache
from jax._src import compiler
from jax._src import config
from jax._src import distributed

from sage_opd_jax import main

_write_from_process_0 = compiler._cache_write  # pylint: disable=protected-access


def _cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
  """`compiler._cache_write` (the same conditions) on any process."""
  if distributed.global_state.process_id == 0:
    return _write_from_process_0(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
  if host_callbacks or compile_time_secs < config.persistent_cache_min_compile_time_secs.value:
    return None
  return compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                   int(compile_time_secs))


if __name__ == "__main__":
  compiler._cache_write = _cache_write  # pylint: disable=protected-access
  sys.argv[0] = main.__file__
  app.run(main.main)
