"""Scaling arithmetic: memory per GPU now; laws, presets and the planner build on it."""
