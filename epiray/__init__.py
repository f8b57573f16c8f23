"""epiray: genome-scale imputation of epigenomic compendia on Ray.

Avocado (and its cross-species extension) and eDICE, trained per chromosome with Ray Train on
a Parquet store of 25 bp binned tracks written by Ray Data.
"""

__version__ = "0.1.0"
