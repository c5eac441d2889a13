"""`python -m kdlab`: the `kdlab` command line."""

import sys

from kdlab.cli import main

sys.exit(main())
