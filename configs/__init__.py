"""Experiment configs; each module's `get_config()` returns a ConfigDict (see base.py)."""
