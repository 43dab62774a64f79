#!/usr/bin/env bash
# Prepare a Jetson AGX Xavier for repeatable benchmarks: check JetPack/L4T, set the
# maximum power mode (nvpmodel), lock the clocks (jetson_clocks), report the toolchain.
#
#   sudo jetson/setup.sh            # JetPack 5.x (L4T r35) expected
#   sudo jetson/setup.sh --force    # go on with another L4T release
#
# nvpmodel mode 0 is MAXN on AGX Xavier; a mode change may ask for a reboot.
set -euo pipefail

REQUIRED_L4T_MAJOR=35 # JetPack 5.x: TensorRT 8.5, CUDA 11.4, Python 3.8
MAXN_MODE=0
force=false
[[ "${1:-}" == "--force" ]] && force=true

die() {
	echo "setup.sh: $*" >&2
	exit 1
}

[[ -r /etc/nv_tegra_release ]] || die "not a Jetson (no /etc/nv_tegra_release)"
release_line=$(head -n 1 /etc/nv_tegra_release)
l4t_major=$(sed -n 's/^# R\([0-9]*\) (release).*/\1/p' <<<"$release_line")
l4t_revision=$(sed -n 's/.*REVISION: \([0-9.]*\).*/\1/p' <<<"$release_line")
model=$(tr -d '\0' </proc/device-tree/model 2>/dev/null || echo unknown)
jetpack=$(dpkg-query --showformat='${Version}' --show nvidia-jetpack 2>/dev/null || echo "not installed")
echo "board:    $model"
echo "L4T:      R${l4t_major}.${l4t_revision}"
echo "JetPack:  $jetpack"

if [[ "$l4t_major" != "$REQUIRED_L4T_MAJOR" ]]; then
	message="L4T R${l4t_major} found, R${REQUIRED_L4T_MAJOR} (JetPack 5.x) expected"
	$force || die "$message (rerun with --force to go on)"
	echo "setup.sh: warning: $message" >&2
fi
[[ "$model" == *Xavier* ]] || echo "setup.sh: warning: board is not a Xavier; mode $MAXN_MODE may differ" >&2

[[ $EUID -eq 0 ]] || die "run as root (sudo) to change the power mode and clocks"
command -v nvpmodel >/dev/null || die "nvpmodel not found"
command -v jetson_clocks >/dev/null || die "jetson_clocks not found"

nvpmodel -m "$MAXN_MODE"
nvpmodel -q
jetson_clocks
jetson_clocks --show | head -n 20

echo "--- toolchain"
python3 --version
python3 -c 'import tensorrt; print("tensorrt", tensorrt.__version__)' ||
	echo "setup.sh: warning: python3 cannot import tensorrt (install JetPack's python3-libnvinfer)" >&2
python3 -c 'import pycuda; print("pycuda", pycuda.VERSION_TEXT)' 2>/dev/null ||
	python3 -c 'import cuda; print("cuda-python present")' 2>/dev/null ||
	echo "setup.sh: warning: neither pycuda nor cuda-python: pip3 install pycuda" >&2
python3 -c 'import jtop; print("jetson-stats", jtop.__version__)' 2>/dev/null ||
	echo "setup.sh: warning: jetson-stats missing, no power numbers: sudo pip3 install jetson-stats" >&2
if [[ -x /usr/src/tensorrt/bin/trtexec ]]; then
	echo "trtexec  /usr/src/tensorrt/bin/trtexec"
else
	echo "setup.sh: warning: trtexec not at /usr/src/tensorrt/bin (gdws-deploy trtexec needs it)" >&2
fi
echo "setup.sh: ready: power mode $MAXN_MODE, clocks locked (until reboot)"
