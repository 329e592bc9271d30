#!/usr/bin/env bash
# Collect, on the CPU machine, the wheels that the GPU machine's image lacks, so that a GPU run
# installs them with `pip install --no-index` (that machine reaches no package registry).
#
#   bash bench/gpu_wheels.sh            # bench: what bench/gpu.py needs      -> .whl/        (~25 MiB)
#   bash bench/gpu_wheels.sh mlflow     # mlflow and its missing needs        -> .whl-mlflow/
#   bash bench/gpu_wheels.sh ray        # ray, split in parts under 60 MiB    -> .whl-ray/
#
# The GPU image (python 3.12, x86_64; torch 2.11, transformers 5.17, peft, pyarrow, numpy,
# pillow, pyyaml, fsspec, msgpack, psutil, py-cpuinfo, einops, ninja, tqdm, nvidia-ml-py ...)
# has no ray, deepspeed, mlflow, omegaconf or pydantic. Versions are pinned to the ones in this
# checkout's .venv, so the GPU run uses exactly what the tests ran here; transformers and peft
# are carried too because the engine is written against the .venv's transformers (the image's
# 5.17 is older). Nothing here runs at GPU run time: bench/README.md shows the run command.
#
# deepspeed has no wheel on PyPI (source release only): its pure-Python wheel (no compiled ops;
# bench/gpu.py uses torch's AdamW so no op is ever JIT-built) is taken from pip's cache, where
# installing the .venv left it, or built from the source release with DS_BUILD_OPS=0.
#
# Only wheels travel: each `run` call carries at most 64 MiB of working tree, so ray's cp312
# wheel (~76 MiB) cannot travel whole; `ray` mode splits it into parts to carry in two calls to
# a warm machine and join there (`cat ray.whl.part-* > /tmp/ray-...whl`). bench/gpu.py needs
# neither ray nor mlflow.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-bench}
PY=${PY:-.venv/bin/python}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# Packages of the GPU image (KINDS.md, read 2026-11-17), normalised: never carried.
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest python-dateutil
pytorch-lightning pyyaml requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken
timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm treescope
triton typer typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
on_image() { local n; n=$(echo "$1" | tr 'A-Z_.' 'a-z--'); [[ " $(echo $IMAGE) " == *" $n "* ]]; }

deepspeed_wheel() {
  local dest=$1 v; v=$(ver deepspeed)
  local cached; cached=$(find "$("$PY" -m pip cache dir)" -name "deepspeed-$v-py3-none-any.whl" 2>/dev/null | head -1 || true)
  if [[ -n "$cached" ]]; then
    cp "$cached" "$dest/"
  else
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "deepspeed==$v"
  fi
}

case "$MODE" in
  bench)
    DEST=.whl; rm -rf "$DEST"; mkdir -p "$DEST"
    deepspeed_wheel "$DEST"
    specs=()
    for p in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions omegaconf \
             antlr4-python3-runtime transformers peft regex; do
      specs+=("$p==$(ver "$p")")
    done
    "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" "${specs[@]}"
    ;;
  mlflow)
    DEST=.whl-mlflow; TMP=$(mktemp -d); rm -rf "$DEST"; mkdir -p "$DEST"
    "$PY" -m pip download -q "${PLAT[@]}" -d "$TMP" "mlflow==$(ver mlflow)"
    for w in "$TMP"/*.whl; do
      name=$(basename "$w" | cut -d- -f1)
      on_image "$name" || mv "$w" "$DEST/"
    done
    rm -rf "$TMP"
    ;;
  ray)
    DEST=.whl-ray; rm -rf "$DEST"; mkdir -p "$DEST"
    "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" "ray==$(ver ray)"
    (cd "$DEST" && for w in *.whl; do split -b 60M "$w" "$w.part-"; rm "$w"; done)
    ;;
  *) echo "usage: $0 [bench|mlflow|ray]" >&2; exit 2 ;;
esac
ls -l "$DEST"
du -sh "$DEST"
echo "carry '$DEST' (at most 64 MiB a call); each name appears once (two versions of one package stop the install)"
