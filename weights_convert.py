#!/usr/bin/env python3
"""Convert a POINTS-1.5 checkpoint into this project's layout (= `points convert`). See `points/io/checkpoint.py`."""

import sys

from points.tooling.convert import main

if __name__ == "__main__":
    sys.exit(main(prog="weights_convert.py"))
