"""`python -m smily.cli`: the `smily` command."""

import sys

from smily.cli import main

sys.exit(main())
