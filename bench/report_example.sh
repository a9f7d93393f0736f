#!/usr/bin/env bash
# Keep a run's report as an example in docs/: the page, its figures, the .bild file, and a screenshot of the page
# in headless Chromium (Debian's `chromium` package) to show that it renders in a real browser.
#   bash bench/report_example.sh data/medium/Refine3D/bench docs/report_example_medium
set -euo pipefail
root=$1; dest=$2
mkdir -p "$dest"
cp "${root}_report.html" "$dest/run_report.html"
for f in "${root}"_report_*.png; do cp "$f" "$dest/run_report_${f##*_report_}"; done
[ -f "${root}_class001_angdist.bild" ] && cp "${root}_class001_angdist.bild" "$dest/run_class001_angdist.bild"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,2600 \
  --screenshot="$(realpath "$dest")/screenshot.png" "file://$(realpath "$dest/run_report.html")" 2>/dev/null
du -sh "$dest"
