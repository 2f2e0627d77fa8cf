"""The whole pipeline as one job: build -> train RETRO and baseline -> eval -> compare -> generate.

ray job submit --working-dir . -- python -m jobs.pipeline --config configs/<preset>.yaml [--set k=v]
"""

import sys

from retro_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
