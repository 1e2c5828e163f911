"""Scaling decisions: published laws and fits of one's own (laws.py, fit.py), the shape rule
(shapes.py), memory per GPU (memory.py), and the planner, presets and sweeps built on them."""
