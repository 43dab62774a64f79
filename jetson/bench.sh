#!/usr/bin/env bash
# Build FP16 / INT8 / DLA engines of an original and a converted model, time each alone
# (with board power when jetson-stats is there), time each pair interleaved, and write one
# comparison table (OUT/summary.md).
#
#   jetson/bench.sh original.onnx converted.onnx [OUT]
#
# Environment: BATCH (32), DURATION seconds per run (10), CALIB dataset for INT8 (e.g.
# npz:calib.npz; INT8 is skipped without it), DLA_CORE (0; "none" skips the DLA rows),
# GDWS (gdws-deploy command). Run jetson/setup.sh first so the clocks are locked.
set -euo pipefail

[[ $# -ge 2 ]] || {
	echo "usage: $0 ORIGINAL.onnx CONVERTED.onnx [OUT]" >&2
	exit 2
}
original=$1
converted=$2
out=${3:-bench-out}
batch=${BATCH:-32}
duration=${DURATION:-10}
calib=${CALIB:-}
dla_core=${DLA_CORE:-0}
gdws=${GDWS:-gdws-deploy}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$out"

# "images 3x32x32": the model's input name and its shape without the batch axis
input_of() {
	"$gdws" build "$1" --parse-only | sed -n 's/^  input \([^:]*\): [^x]*x\(.*\)$/\1 \2/p' | head -n 1
}
read -r input_name sample_shape <<<"$(input_of "$original")"
[[ -n "$input_name" ]] || {
	echo "bench.sh: cannot read the input of $original" >&2
	exit 1
}
profile=(--min-shapes "$input_name:1x$sample_shape"
	--opt-shapes "$input_name:${batch}x$sample_shape"
	--max-shapes "$input_name:${batch}x$sample_shape")

precisions=(fp16)
[[ -n "$calib" ]] && precisions+=(int8)
if [[ "$dla_core" != none ]]; then
	precisions+=(dla-fp16)
	[[ -n "$calib" ]] && precisions+=(dla-int8)
fi

flags_for() {
	case $1 in
	fp16) echo "--fp16" ;;
	int8) echo "--int8 --fp16 --calib $calib --calib-cache $out/$2.calib.cache" ;;
	dla-fp16) echo "--fp16 --dla-core $dla_core --allow-gpu-fallback" ;;
	dla-int8) echo "--int8 --fp16 --calib $calib --calib-cache $out/$2.calib.cache --dla-core $dla_core --allow-gpu-fallback" ;;
	esac
}

have_jtop=false
python3 -c 'import jtop' 2>/dev/null && have_jtop=true
$have_jtop || echo "bench.sh: jetson-stats missing: no power columns (sudo pip3 install jetson-stats)" >&2

for precision in "${precisions[@]}"; do
	for role in original converted; do
		model=$original
		[[ $role == converted ]] && model=$converted
		plan="$out/$role.$precision.plan"
		read -r -a flags <<<"$(flags_for "$precision" "$role")"
		echo "=== build $role $precision"
		"$gdws" build "$model" -o "$plan" "${flags[@]}" "${profile[@]}" \
			--timing-cache "$out/timing.cache"
		bench=("$gdws" bench "$plan" --batch "$batch" --duration "$duration"
			--json "$out/$role.$precision.bench.json")
		echo "=== bench $role $precision"
		if $have_jtop; then
			python3 "$here/power.py" --bench-json "$out/$role.$precision.bench.json" \
				--out "$out/$role.$precision.power.json" -- "${bench[@]}"
		else
			"${bench[@]}"
		fi
	done
	echo "=== interleaved $precision"
	"$gdws" bench "$out/original.$precision.plan" --compare "$out/converted.$precision.plan" \
		--batch "$batch" --duration "$duration" --json "$out/$precision.compare.json"
done

python3 "$here/table.py" "$out"
