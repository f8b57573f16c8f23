"""``ray job submit --working-dir . -- python jobs/ingest.py --config configs/ingest.yaml``

Runs ``epiray ingest``: bigWig / .npy tracks into the Parquet store with Ray Data.
Every option of ``epiray ingest --help`` is forwarded. Connects to the cluster named by
RAY_ADDRESS (set by ``ray job submit``) or starts a local Ray.
"""

import sys

from epiray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
