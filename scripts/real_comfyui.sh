#!/usr/bin/env bash
# Build (once) the real ComfyUI the tests in tests/test_real_comfyui.py start: its source
# unpacked from a tarball, and a virtualenv of its own with torch.
#
#   scripts/real_comfyui.sh TARBALL DIR [PYTHON]
#
# DIR (outside the work tree; the Makefile picks ~/.cache/mgpumanager/real-comfyui/<name>)
# gets DIR/ComfyUI, DIR/venv and, once both are complete, DIR/ready. A DIR with `ready` is
# reused as it is. Where TARBALL is absent, this says so and exits 0: the tests then skip.
#
# Why these packages: ComfyUI's requirements.txt asks for torch, torchvision and torchaudio
# unpinned, which pip answers with the newest CUDA build. `main.py --cpu` needs torch and
# torchvision (comfy/sd.py imports comfy/ldm/cascade, which imports torchvision at module
# level), not torchaudio (optional in comfy_api; the audio nodes are skipped at start with a
# warning), nor kornia or spandrel (their nodes are skipped likewise). torch and torchvision
# must be a matching pair (else `operator torchvision::nms does not exist` at start): per
# machine, the pair pip finds lightest. `requests` is imported by app/frontend_management.py
# but missing from requirements.txt.
set -euo pipefail

tarball=${1:?usage: real_comfyui.sh TARBALL DIR [PYTHON]}
dir=${2:?usage: real_comfyui.sh TARBALL DIR [PYTHON]}
python=${3:-python3}
# The torch/torchvision pair: on aarch64 a CPU build (about 0.7 GB); on x86_64 the pair that
# lies on this project's machines' disk (a CUDA build, which runs fine with --cpu). Elsewhere
# REAL_COMFYUI_TORCH="torch==... torchvision==..." and, for PyPI's CPU builds,
# REAL_COMFYUI_TORCH_INDEX=https://download.pytorch.org/whl/cpu.
case "$(uname -m)" in
  aarch64 | arm64) default_torch="torch==2.9.1 torchvision==0.24.1" ;;
  *) default_torch="torch==2.14.1 torchvision==0.29.1" ;;
esac
read -r -a torch_spec <<<"${REAL_COMFYUI_TORCH:-$default_torch}"
torch_index=()
if [[ -n "${REAL_COMFYUI_TORCH_INDEX:-}" ]]; then
  torch_index=(--extra-index-url "$REAL_COMFYUI_TORCH_INDEX")
fi

if [[ -e "$dir/ready" ]]; then
  echo "real ComfyUI: reusing $dir"
  exit 0
fi
if [[ ! -f "$tarball" ]]; then
  echo "real ComfyUI: no tarball at $tarball; the real-ComfyUI tests will be skipped" \
    "(set REAL_COMFYUI_TARBALL=... to point at one)" >&2
  exit 0
fi

start=$(date +%s)
rm -rf "$dir"
mkdir -p "$dir"
tar -xzf "$tarball" -C "$dir"
test -f "$dir/ComfyUI/main.py" || { echo "real ComfyUI: $tarball has no ComfyUI/main.py" >&2; exit 1; }

"$python" -m venv "$dir/venv"
pip=("$dir/venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install --upgrade pip
# The pair first and alone, so that nothing below can pull in another build beside it.
"${pip[@]}" install "${torch_spec[@]}" "${torch_index[@]}"
"$dir/venv/bin/python" -c 'import torch, torchvision; print("real ComfyUI: torch", torch.__version__)'
grep -v -E '^\s*(#|$)|^(torch|torchvision|torchaudio|kornia|spandrel)\b' \
  "$dir/ComfyUI/requirements.txt" >"$dir/requirements-cpu.txt"
echo requests >>"$dir/requirements-cpu.txt"
"$dir/venv/bin/python" -m pip freeze | grep -i -E '^torch(vision)?==' >"$dir/constraints.txt"
"${pip[@]}" install -r "$dir/requirements-cpu.txt" -c "$dir/constraints.txt"

touch "$dir/ready"
echo "real ComfyUI: built $dir in $(($(date +%s) - start)) s, $(du -sh "$dir" | cut -f1)"
