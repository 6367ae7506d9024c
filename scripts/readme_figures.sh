#!/usr/bin/env bash
# Regenerate the figures README.md shows: run the main job (grids/image_strategies.yaml; see its header for the
# cost), analyse it, and copy the figures into docs/figures/. A rerun skips the runs already completed.
#
#   bash scripts/readme_figures.sh [RESULTS_DIR]      # default: results
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-results}
sweep=${SWEEP:-.venv/bin/sweep}
"$sweep" launch grids/image_strategies.yaml --results "$results" --executor local --quiet
"$sweep" analyze "$results/image_strategies"   # as the grid's analysis: section says
mkdir -p docs/figures
for name in drop_vs_tokens min_tokens_vs_params; do
    cp "$results/image_strategies/analysis/figures/$name.png" docs/figures/
done
echo "docs/figures/ updated from $results/image_strategies"
