"""`pretrain` with rank 1 killed by SIGKILL in the middle of writing checkpoint step CRASH_AT_STEP
(after it wrote part of its shard), as a node failure would. Run it under torchrun."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from pretrain.cli import main
from pretrain.parallel.engine import TorchEngine

CRASH_DIR = f"step_{int(os.environ['CRASH_AT_STEP']):08d}"
save = TorchEngine.save


def save_then_die(self: TorchEngine, path: Path) -> None:
    if os.environ.get("RANK") == "1" and path.name.endswith(CRASH_DIR):
        (path / "__1_0.distcp").write_bytes(b"half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, path)


TorchEngine.save = save_then_die

if __name__ == "__main__":
    sys.exit(main())
