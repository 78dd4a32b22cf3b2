#!/usr/bin/env bash
# Idempotent set-up of .venv: torch first (from local disk where pip finds it),
# then the project and its pins. Re-runs only when pyproject.toml or this file
# change. Pip's cache (~/.cache/pip) keeps wheels outside the work tree; the
# OpenMMLab stack (dense stages) comes from scripts/setup-openmmlab.sh, whose
# compiled mmcv wheel is kept in ~/.cache/iformer-pipeline/wheelhouse.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv
# The browser test (tests/test_browser.py) drives Debian's chromium through its
# chromedriver; installed as root (CI, these machines) when missing, else said.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium and chromium-driver (apt)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup: chromium/chromedriver missing; the browser test needs: sudo apt-get install chromium chromium-driver" >&2
  fi
fi
stamp="$VENV/.setup-$(cat pyproject.toml scripts/setup.sh scripts/setup-openmmlab.sh scripts/quietly.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setup: creating $VENV with $($PY --version)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -q -e ".[test]"
bash scripts/setup-openmmlab.sh "$VENV"
# DVC's per-repo state (hashes, locks) stays inside the repo, not /var/tmp.
DVC_NO_ANALYTICS=1 "$VENV/bin/dvc" config --local core.site_cache_dir "$PWD/.dvc/tmp/site-cache"
rm -f "$VENV"/.setup-*
touch "$stamp"
echo "setup: done" >&2
