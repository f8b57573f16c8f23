"""``ray job submit --working-dir . -- python jobs/extend.py --config configs/extend_avocado.yaml``

Runs ``epiray extend``: fits the new biosamples, assays or chromosomes of a store onto trained
runs (everything else frozen), one Ray Train run per chromosome. Every option of ``epiray
extend --help`` is forwarded. Connects to the cluster named by RAY_ADDRESS (set by ``ray job
submit``) or starts a local Ray.
"""

import sys

from epiray.cli import main

if __name__ == "__main__":
    sys.exit(main(["extend", *sys.argv[1:]]))
