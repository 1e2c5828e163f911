"""The hang watchdog: a process that stops beating dumps its stacks, tagged by rank, in one
piece and exits with HUNG_EXIT_CODE; one that keeps beating is left alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from pretrain.resilience.watchdog import HUNG_EXIT_CODE

SCRIPT = textwrap.dedent("""
    import time
    {prelude}
    from pretrain.resilience.watchdog import HangWatchdog

    def stuck_in_a_collective():
        time.sleep(60)

    with HangWatchdog(timeout_s={timeout}, rank=3) as watchdog:
        for step in range(8):
            watchdog.beat(f"step {{step}}")
            time.sleep(0.1)
        {after_loop}
    print("finished")
""")


def run_script(timeout: float, after_loop: str, prelude: str = "") -> subprocess.CompletedProcess:
    script = SCRIPT.format(timeout=timeout, after_loop=after_loop, prelude=prelude)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_a_process_that_stops_beating_dumps_tagged_stacks_and_exits():
    result = run_script(1.0, "stuck_in_a_collective()")
    assert result.returncode == HUNG_EXIT_CODE, result.stderr
    assert "finished" not in result.stdout
    lines = result.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("--- rank 3: Python stacks after"))
    assert "in step 7 ---" in lines[header]
    stacks = lines[header + 1:]
    assert stacks and all(line.startswith("[rank 3] ") for line in stacks), result.stderr
    assert any("in stuck_in_a_collective" in line for line in stacks), result.stderr


def test_a_process_that_keeps_beating_is_left_alone():
    result = run_script(1.0, "pass")
    assert result.returncode == 0 and "finished" in result.stdout, result.stderr
    assert "Python stacks" not in result.stderr


def test_without_room_for_the_dump_file_it_still_dumps_and_exits():
    no_room = "import tempfile; tempfile.TemporaryFile = lambda: (_ for _ in ()).throw(OSError(28, 'No space left'))"
    result = run_script(1.0, "stuck_in_a_collective()", prelude=no_room)
    assert result.returncode == HUNG_EXIT_CODE, result.stderr
    assert "--- rank 3: Python stacks after" in result.stderr and "in stuck_in_a_collective" in result.stderr
