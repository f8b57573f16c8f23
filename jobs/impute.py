"""``ray job submit --working-dir . -- python jobs/impute.py --config configs/impute.yaml``

Runs ``epiray impute``: imputed tracks from a trained model.
Every option of ``epiray impute --help`` is forwarded. Connects to the cluster named by
RAY_ADDRESS (set by ``ray job submit``) or starts a local Ray.
"""

import sys

from epiray.cli import main

if __name__ == "__main__":
    sys.exit(main(["impute", *sys.argv[1:]]))
