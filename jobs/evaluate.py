"""``ray job submit --working-dir . -- python jobs/evaluate.py --config configs/evaluate.yaml``

Runs ``epiray evaluate``: comparison tables and paired tests of trained runs.
Every option of ``epiray evaluate --help`` is forwarded. Connects to the cluster named by
RAY_ADDRESS (set by ``ray job submit``) or starts a local Ray.
"""

import sys

from epiray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
