"""``ray job submit --working-dir . -- python jobs/export.py --run RUNS/avocado.{chrom}.fold0
--out EXPORT``

Runs ``epiray export``: a trained run's genome factors (Parquet, bigWig), biosample/assay
factors or embeddings (TSV) and network weights (.npz). Every option of ``epiray export
--help`` is forwarded. It reads the checkpoints from shared storage on the node the job's
driver runs on and starts no Ray tasks.
"""

import sys

from epiray.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
