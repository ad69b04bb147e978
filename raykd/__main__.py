"""`python -m raykd` is the `raykd` command."""
import sys

from raykd.cli import main

if __name__ == "__main__":
    sys.exit(main())
