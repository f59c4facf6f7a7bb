import sys

from .main import main

# The guard matters: the planner search's worker processes (spawn) import the main module again.
if __name__ == "__main__":
    sys.exit(main())
