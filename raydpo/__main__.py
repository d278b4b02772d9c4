"""`python -m raydpo ...` is the same command as `raydpo ...`."""

import sys

from raydpo.cli import main

sys.exit(main())
