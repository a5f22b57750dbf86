#!/usr/bin/env bash
# Runs inside the new conda env, from the project root: add the cifar-ensembles command.
set -euo pipefail
python -m pip install --no-deps --no-build-isolation .
