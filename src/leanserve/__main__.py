"""`python -m leanserve ...` is the `leanserve` command."""
import sys

from .cli import main

sys.exit(main())
