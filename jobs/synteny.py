"""``ray job submit --working-dir . -- python jobs/synteny.py --config configs/synteny.yaml``

Runs ``epiray synteny``: a chain file into bin alignments and human tracks on mouse bins.
Every option of ``epiray synteny --help`` is forwarded. Connects to the cluster named by
RAY_ADDRESS (set by ``ray job submit``) or starts a local Ray.
"""

import sys

from epiray.cli import main

if __name__ == "__main__":
    sys.exit(main(["synteny", *sys.argv[1:]]))
