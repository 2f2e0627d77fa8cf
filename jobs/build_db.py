"""`ray job submit --working-dir . -- python -m jobs.build_db --config configs/<preset>.yaml [--set k=v]`."""

import sys

from retro_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-db", *sys.argv[1:]]))
