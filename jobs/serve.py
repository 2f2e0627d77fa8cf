"""`ray job submit --working-dir . -- python -m jobs.serve --config configs/<preset>.yaml [--model URI]`.

Deploys the model service on the cluster (Ray Serve keeps it running after the job's driver exits only
while the job runs: stop the job to stop serving, or use `serve deploy serve.yaml`)."""

import sys

from retro_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
