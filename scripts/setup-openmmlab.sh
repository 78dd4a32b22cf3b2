#!/usr/bin/env bash
# Idempotent install of the OpenMMLab stack used by the dense fine-tuning stages
# (mmengine 0.10.7, mmcv 2.1.0 with compiled CPU ops, mmdet 3.3.0, mmseg 1.2.2)
# into a venv (first argument, default .venv) that already has torch 2.14.1.
#
# There is no mmcv wheel for this torch. The PyPI sdist builds once two things
# are handled: setuptools < 81 (mmcv's setup.py and mmengine import
# pkg_resources) and -std=c++20 (torch 2.14's headers refuse C++17). The built
# wheel is kept in a wheelhouse outside the work tree so later set-ups on the
# same machine reuse it; pip's own cache cannot, since the unpatched sdist never
# builds. CFLAGS replaces Python's default flags: without -O2 the ops run 3-5x
# slower, without CFLAGS at all the build takes ~25 min instead of ~6.
# Never install mmcv-lite beside mmcv: both own the `mmcv` package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PIP=("$VENV/bin/python" -m pip)
WHEELHOUSE=${IFORMER_WHEELHOUSE:-$HOME/.cache/iformer-pipeline/wheelhouse}
MMCV=2.1.0

"${PIP[@]}" install -q "setuptools==80.10.2"

shopt -s nullglob
wheels=("$WHEELHOUSE"/mmcv-$MMCV-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  log="$WHEELHOUSE/mmcv-$MMCV-build.log"
  echo "setup-openmmlab: building mmcv $MMCV (about 6 min on 2 cores), its output in $log" >&2
  mkdir -p "$WHEELHOUSE"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # pip reads the sdist's metadata by running its setup.py: without isolation,
  # so it sees the setuptools pinned above (an isolated env gets setuptools>=81).
  "${PIP[@]}" download -q --no-deps --no-build-isolation --no-binary mmcv "mmcv==$MMCV" -d "$work"
  tar -xzf "$work"/mmcv-$MMCV.tar.gz -C "$work"
  sed -i 's/-std=c++17/-std=c++20/g' "$work/mmcv-$MMCV/setup.py"
  grep -q -- '-std=c++20' "$work/mmcv-$MMCV/setup.py"
  # Build into the temp dir, then move: an interrupted build leaves no wheel. The compiler's and
  # setuptools' hundreds of lines go to the log; the console gets a line a minute (scripts/quietly.sh).
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 CFLAGS="-O2 -g0 -DNDEBUG -fwrapv" \
    bash scripts/quietly.sh "$log" "setup-openmmlab: mmcv build" \
    "${PIP[@]}" wheel --no-build-isolation --no-deps "$work/mmcv-$MMCV" -w "$work/dist"
  mv "$work"/dist/mmcv-$MMCV-*.whl "$WHEELHOUSE"/
  wheels=("$WHEELHOUSE"/mmcv-$MMCV-*.whl)
fi

"${PIP[@]}" install -q "mmengine==0.10.7" "mmdet==3.3.0" "mmsegmentation==1.2.2" \
  ftfy regex pycocotools "setuptools==80.10.2"
"${PIP[@]}" install -q --no-deps "${wheels[0]}"
"$VENV/bin/python" -c "import mmcv.ops, mmdet, mmseg; from mmcv.ops import RoIAlign, nms"
echo "setup-openmmlab: mmcv $MMCV ($(basename "${wheels[0]}")), mmdet, mmseg ready" >&2
