"""`python -m recstack.world --preset tiny --seed 0 --out DIR [--set k=v ...]` (same as `recstack simulate`)."""
import sys

from recstack.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", *sys.argv[1:]]))
