"""`ray job submit --working-dir . -- python -m jobs.eval --config configs/<preset>.yaml [--set k=v]`."""

import sys

from retro_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
