"""`python -m recstack ...` is the `recstack` console script."""
import sys

from recstack.cli import main

if __name__ == "__main__":
    sys.exit(main())
