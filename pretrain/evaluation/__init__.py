"""Judging the model: validation loss and bits per byte (validation.py), sampling (generate.py) and
the runner of eval hooks on published checkpoints (hook_runner.py; shipped hooks: pretrain/hooks.py)."""
