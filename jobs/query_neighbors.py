"""`ray job submit --working-dir . -- python -m jobs.query_neighbors --config configs/<preset>.yaml`."""

import sys

from retro_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["query-neighbors", *sys.argv[1:]]))
