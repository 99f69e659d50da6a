"""``python -m fastsip.server [serve flags]``: the same as ``fastsip serve``."""
import sys

from fastsip.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
