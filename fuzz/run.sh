#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 600: ten CPU-minutes each), two at a time,
# with the nightly toolchain. Never run in CI. The working corpus grows in corpus/TARGET
# (not kept in git); seeds/TARGET is where each starts. A crash leaves its input in
# artifacts/TARGET/ and its log in logs/TARGET.log; each one becomes a regression test.
set -uo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
targets=(pipeline_validate hub_ingest_body module_answer_body mqtt_payload device_token target_condition outbox_salvage)
cargo +nightly fuzz build || exit 1
mkdir -p logs
run() {
  mkdir -p "corpus/$1"
  cargo +nightly fuzz run "$1" "corpus/$1" "seeds/$1" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=30 -print_final_stats=1 \
    >"logs/$1.log" 2>&1
  echo "$1: exit $? ($(grep -h -m1 -o 'stat::number_of_executed_units: *[0-9]*' "logs/$1.log" | grep -o '[0-9]*$') runs)"
}
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  run "${targets[i]}" &
  if ((i + 1 < ${#targets[@]})); then run "${targets[i + 1]}" & fi
  wait
done
