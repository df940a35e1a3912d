#!/usr/bin/env python3
"""The benchmark table: ours vs transformers on the same random weights (same as `points bench`).

    python tools/bench.py --preset small [--dtype bfloat16] [--compile] [--profile] [--json out.json]

The code lives in points/bench.py so that an installed `points bench` runs it too.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from points.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
