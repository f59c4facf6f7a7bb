import sys

from .cli import main

# The guard matters: the search's worker processes (spawn) import the main module again.
if __name__ == "__main__":
    sys.exit(main())
