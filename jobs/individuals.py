"""Runs ``epiray individuals``, the eDICE personalised leave-one-out protocol, on Ray::

    ray job submit --working-dir . -- \\
        python jobs/individuals.py --config configs/individuals.yaml

One Ray task per target donor. Every option of ``epiray individuals --help`` is forwarded.
Connects to the cluster named by RAY_ADDRESS (set by ``ray job submit``) or starts a local Ray.
"""

import sys

from epiray.cli import main

if __name__ == "__main__":
    sys.exit(main(["individuals", *sys.argv[1:]]))
