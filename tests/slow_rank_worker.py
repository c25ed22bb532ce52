"""``ndot worker`` for torchrun, with rank 1 slow to start after a restart (tests/test_cluster_service.py).

A restarted group whose ranks start at different speeds must still form: the ranks key their process
group's store by the restart attempt, so the fast rank never reads the previous attempt's addresses.
"""

from __future__ import annotations

import os
import sys
import time

from service.cli import main

if __name__ == "__main__":
    if os.environ.get("RANK") == "1" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        time.sleep(float(os.environ.get("SLOW_RANK_DELAY_S", "4")))
    sys.exit(main(["worker"]))
