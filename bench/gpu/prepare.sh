#!/usr/bin/env bash
# Run here, on the CPU machine, before bench/gpu/run.sh goes to a lent GPU machine: that machine
# has torch, torchvision, numpy, pyarrow, scikit-learn and pillow but no package registry, so
# the few pure-Python packages the Ray-free layer and its tests need (PyYAML, tqdm, lpips,
# pytest and its plugins' base) and Fashion-MNIST's four files are copied into .gpu_carry/
# (ignored by git; ~36 MB, under the 64 MiB a run carries). Then, with the device tool:
#   run(command="bash bench/gpu/run.sh", carry=[".gpu_carry"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DATA=${NATRA_DATA_DIR:-/usr/share/datasets/fashion-mnist}
rm -rf .gpu_carry && mkdir -p .gpu_carry/site .gpu_carry/data
"$PY" - .gpu_carry/site <<'PYEOF'
import importlib, pathlib, shutil, sys

dest = pathlib.Path(sys.argv[1])
# pure Python (PyYAML falls back from its C extension by itself); no torch, numpy or scipy
for name in ("yaml", "tqdm", "lpips", "pytest", "_pytest", "pluggy", "iniconfig", "packaging", "py"):
    try:
        mod = importlib.import_module(name)
    except ImportError:
        continue
    src = pathlib.Path(mod.__file__)
    if src.name == "__init__.py":
        shutil.copytree(src.parent, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    else:
        shutil.copy2(src, dest / src.name)
print("carried:", ", ".join(sorted(p.name for p in dest.iterdir())))
PYEOF
cp "$DATA"/*-ubyte.gz .gpu_carry/data/
du -sh .gpu_carry
