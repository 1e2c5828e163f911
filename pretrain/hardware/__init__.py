"""The machine: devices, precision and peak FLOP/s (devices.py), checks before any compute
(preflight.py) and what to do after running out of memory (memory_advice.py)."""
