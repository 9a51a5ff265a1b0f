#!/usr/bin/env python3
"""Verify checkpoints; optionally quarantine the bad ones: `python tools/check_ckpt.py --help`.

The same as the installed console script `check_ckpt` (mapanything_ext/checkpoint/cli.py).
"""

import sys

from mapanything_ext.checkpoint.cli import main

if __name__ == "__main__":
    sys.exit(main())
