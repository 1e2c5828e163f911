"""Checkpoints: the manager that saves, publishes and resumes (manager.py), the on-disk layout and
manifest (layout.py), and loading pickles safely (safe_load.py)."""
