"""End to end at the paper's widths (``meteor.bench.e2e``; ``meteor bench`` runs the same)."""

import sys

from meteor.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
