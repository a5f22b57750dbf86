"""cifar-ensembles: the library behind the Snakemake workflow.

albumentations checks PyPI for a newer release on import; that call hangs or fails on
offline clusters, so it is switched off here, before anything imports albumentations.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
