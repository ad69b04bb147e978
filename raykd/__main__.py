"""`python -m raykd` is the `raykd` command."""
import sys

from raykd.cli import main

sys.exit(main())
