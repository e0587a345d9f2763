"""SAGE-OPD: selective, agent-guided multi-turn on-policy distillation in JAX."""

__version__ = "0.1.0"
