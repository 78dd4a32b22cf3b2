#!/usr/bin/env bash
# Rebuild .dvc/plots/offline.html: DVC's plot page with vega, vega-lite and
# vega-embed inlined from their npm packages, so `dvc plots show/diff` render
# with no network. DVC fills `{plot_divs}`; the template has no `{scripts}`
# placeholder, so DVC's CDN <script> tags are never inserted. The page is
# committed (~0.85 MB); rerun this only to change the versions below.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=("vega@5.33.1" "vega-lite@5.23.0" "vega-embed@6.29.0")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "${VERSIONS[@]}" >/dev/null)
for tgz in "$work"/*.tgz; do mkdir -p "${tgz%.tgz}" && tar xzf "$tgz" -C "${tgz%.tgz}"; done
out=.dvc/plots
mkdir -p "$out"
python3 - "$work" "$out" "${VERSIONS[@]}" <<'PY'
import json, sys
from pathlib import Path

work, out, versions = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
scripts, notes = [], []
for spec in versions:
    name, version = spec.rsplit("@", 1)
    pkg = work / f"{name}-{version}" / "package"
    meta = json.loads((pkg / "package.json").read_text())
    js = (pkg / "build" / f"{name}.min.js").read_text()
    assert "</script" not in js.lower(), f"{name} cannot be inlined"
    scripts.append(f"<script>/* {name} {version} ({meta['license']}), from its npm package */\n{js}\n</script>")
    lic = pkg / "LICENSE"
    text = lic.read_text() if lic.is_file() else f"{meta['license']} (package.json; the package ships no LICENSE file)"
    notes.append(f"## {name} {version}\n\n{text.strip()}\n")
page = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    %s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
""" % "\n".join(scripts)
(out / "offline.html").write_text(page)
(out / "LICENSES.md").write_text("# Inlined in offline.html (scripts/vendor-vega.sh)\n\n" + "\n".join(notes))
PY
ls -l "$out"
