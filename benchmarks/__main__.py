"""`python -m benchmarks NAME ...`: the same as `aevb bench NAME ...`."""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
