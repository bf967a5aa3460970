"""`python -m cryomamba`: the same as the `cryomamba` command."""

import sys

from cryomamba.cli import main

if __name__ == "__main__":
    sys.exit(main())
