"""Surviving faults: crash-safe writes (atomic_dir.py), signals and preemption (preemption.py), bad
steps (step_guard.py), hangs (watchdog.py), one run per out_dir (run_lock.py) and the fault
injection that tests all of them (faults.py)."""
