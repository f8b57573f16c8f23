"""``ray job submit --working-dir . -- python jobs/train.py --config configs/train_avocado.yaml``

Connects to the cluster named by RAY_ADDRESS (set by ``ray job submit``) or starts a local Ray.
"""

import sys

from epiray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
