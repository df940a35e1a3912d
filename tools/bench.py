#!/usr/bin/env python3
"""The benchmark table: ours vs transformers on the same random weights (same as `points bench`).

    python tools/bench.py --preset small [--dtype bfloat16] [--compile] [--profile] [--json out.json]

The code lives in points/tooling/bench.py so that an installed `points bench` runs it too.
"""

import sys

from points.tooling.bench import main

if __name__ == "__main__":
    sys.exit(main())
