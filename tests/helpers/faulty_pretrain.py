"""pretrain_crystal.py with the faults a test asked for (fault_injection.py), as a torchrun worker: for the
tests of in-job restarts, where torchrun itself must start (and restart) the ranks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]
    import fault_injection

    import pretrain_crystal

    fault_injection.install(os.environ)
    sys.argv[0] = str(REPO / "pretrain_crystal.py")
    sys.exit(pretrain_crystal.main())
