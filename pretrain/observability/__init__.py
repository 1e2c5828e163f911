"""What a run tells its people: console logging (log_setup.py), metrics.jsonl and trackers
(metrics.py, tracking.py), the progress bar (progress.py) and the HTML/PNG run report (report*.py)."""
