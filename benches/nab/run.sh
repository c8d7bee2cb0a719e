#!/usr/bin/env bash
# Runs Weir's default anomaly detector over every CSV under DATA_DIR and writes NAB-format
# results (timestamp,anomaly_score, one row per input row) to OUT_DIR at the same
# relative paths. The detector is the real `anomaly` transform inside a real pipeline
# (detector.yaml): a file source over the folder, keyed by file, and a file sink
# partitioned by file. One configuration serves every series.
#
#   benches/nab/run.sh DATA_DIR OUT_DIR
#
# Uses $WEIR_BIN when set; otherwise builds and uses target/$WEIR_PROFILE/weir
# (WEIR_PROFILE defaults to debug, which is fast enough for NAB's 139k rows).
# Scoring is separate: see benches/nab/README.md.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 DATA_DIR OUT_DIR" >&2
    exit 2
fi
data_dir=$(cd "$1" && pwd)
mkdir -p "$2"
out_dir=$(cd "$2" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

weir=${WEIR_BIN:-}
if [[ -z $weir ]]; then
    profile=${WEIR_PROFILE:-debug}
    flag=()
    [[ $profile == release ]] && flag=(--release)
    cargo build --quiet --manifest-path "$root/Cargo.toml" --bin weir "${flag[@]}"
    weir=$root/target/$profile/weir
fi

count=$(find "$data_dir" -name '*.csv' | wc -l)
echo "nab: scoring $count series under $data_dir into $out_dir" >&2
started=$(date +%s%N)
NAB_DATA=$data_dir NAB_OUT=$out_dir "$weir" run --no-metrics "$here/detector.yaml"
finished=$(date +%s%N)
written=$(find "$out_dir" -name '*.csv' | wc -l)
echo "nab: wrote $written result files in $(( (finished - started) / 1000000 )) ms" >&2
if [[ $written -ne $count ]]; then
    echo "nab: expected $count result files, found $written" >&2
    exit 1
fi
