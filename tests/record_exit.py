"""Runs train_loop.py as `accelerate launch` would (as __main__, same argv), and records the
process's own exit code in $RECORD_EXIT_DIR/exit-<rank>.txt before it exits with it.

The launcher above reports its workers' fate in a way of its own (torchrun's agent, accelerate's
wrapper), which changes between their releases; this is the code each of our processes exits with.
"""

import os
import runpy
import sys
from pathlib import Path

script = sys.argv[1]
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    raise
except BaseException:
    code = 1
    raise
finally:
    rank = os.environ.get("RANK", "0")
    Path(os.environ["RECORD_EXIT_DIR"], f"exit-{rank}.txt").write_text(str(code))
