"""`ray job submit --working-dir . -- python -m jobs.train --config configs/<preset>.yaml [--set k=v]`."""

import sys

from retro_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
