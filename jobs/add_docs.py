"""`ray job submit --working-dir . -- python -m jobs.add_docs --config configs/<preset>.yaml FILE...`."""

import sys

from retro_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["add-docs", *sys.argv[1:]]))
