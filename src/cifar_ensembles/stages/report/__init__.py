"""The report stage (workflow/rules/report.smk): figures and summary tables, drawn only
from files earlier stages wrote, so they can be restyled and redrawn without retraining.

- `figures`: training curves, ensemble curves, reliability diagrams, accuracy and cost.
- `shift_figures`: accuracy and ECE under shift, member diversity.
- `summary`: summary.md and summary.csv.
- `plotting`: what every figure shares (backend, style, colours, atomic save).
"""

import matplotlib

matplotlib.use("Agg")  # before any module here imports pyplot: figures are files, never windows
