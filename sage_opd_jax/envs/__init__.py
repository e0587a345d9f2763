"""Text environments behind one host-side protocol (see `base.Env`)."""

from sage_opd_jax.envs.base import NOTHING_HAPPENS, Env, StepInfo, StepResult, Task, make, register, registered

__all__ = ["NOTHING_HAPPENS", "Env", "StepInfo", "StepResult", "Task", "make", "register", "registered"]
