import sys

from points.cli import main

sys.exit(main())
