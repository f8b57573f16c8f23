"""``ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep_cv.yaml``

Runs ``epiray sweep``: a Ray Tune sweep over folds, chromosomes, model variants and
hyperparameters (:mod:`epiray.sweep`); re-submitting the same config resumes it.
Every option of ``epiray sweep --help`` is forwarded. Connects to the cluster named by
RAY_ADDRESS (set by ``ray job submit``) or starts a local Ray.
"""

import sys

from epiray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
