import sys

from points.tooling.cli import main

sys.exit(main())
