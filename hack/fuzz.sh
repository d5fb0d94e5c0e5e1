#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a number of executions (default 10,000,000), one
# target after another, one process at a time; installs the nightly toolchain and
# cargo-fuzz if missing. CI does not run this: it replays the committed corpus through
# `cargo test --test fuzz_corpus` on stable (see RELIABILITY.md, "Fuzzing").
#
#   bash hack/fuzz.sh [RUNS] [TARGET...]
#
# FUZZ_SANITIZER=none builds without AddressSanitizer (3 to 12 times as fast here;
# debug assertions and overflow checks stay on), for the targets whose AddressSanitizer
# runs would take hours. BeeMesh's code is safe Rust; the unsafe code underneath
# (serde_yaml's unsafe-libyaml, zlib-rs) is then checked only by its own assertions
# (see RELIABILITY.md, "Fuzzing").
#
# New inputs go to a scratch corpus ($FUZZ_WORK/<target>, /tmp/beemesh-fuzz by default);
# the committed corpus fuzz/corpus/<target> is only read. Logs, with libFuzzer's final
# stats (executions, exec/s, peak RSS), go to $FUZZ_LOGS/<target>.log. A crash stops the
# script, with the input in fuzz/artifacts/<target>/. To keep what a run found (the
# inputs that add coverage, as a set cover over the old corpus and the run's):
#   cd fuzz && mkdir new && cp corpus/<target>/seed-* new/
#   cargo +nightly fuzz run -O -a <target> new corpus/<target> $FUZZ_WORK/<target> -- -set_cover_merge=1
#   rm -r corpus/<target> && mv new corpus/<target>
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

runs="${1:-10000000}"
shift || true
work="${FUZZ_WORK:-/tmp/beemesh-fuzz}"
logs="${FUZZ_LOGS:-$work/logs}"
mkdir -p "$work" "$logs"

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --locked
fi

# Longest input worth trying, per target: a few real messages' worth.
max_len() {
  case "$1" in
    wire_message | mesh_stream | translate_pod | manifest_yaml) echo 16384 ;;
    trust_records | spdy_frames | spdy_session | raft_frames) echo 8192 ;;
    spdy_header_block) echo 4096 ;;
    ws_channel | tunnel_frame) echo 1024 ;;
    kubelet_query) echo 512 ;;
    quantity) echo 64 ;;
    *) echo 4096 ;;
  esac
}

dict() {
  case "$1" in
    wire_message | mesh_stream | trust_records | translate_pod | manifest_yaml)
      echo "-dict=dicts/json.dict" ;;
  esac
}

# Release build with debug assertions and overflow checks (-a), AddressSanitizer unless
# told otherwise.
sanitizer="${FUZZ_SANITIZER:-address}"
cargo +nightly fuzz build -O -a -s "$sanitizer"

targets=("$@")
if [ "${#targets[@]}" = 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
for target in "${targets[@]}"; do
  mkdir -p "$work/$target"
  echo "== $target: $runs runs"
  start=$(date +%s)
  # shellcheck disable=SC2046 # dict is one word or none
  cargo +nightly fuzz run -O -a -s "$sanitizer" "$target" "$work/$target" "corpus/$target" -- \
    -runs="$runs" -rss_limit_mb=512 -malloc_limit_mb=64 -max_len="$(max_len "$target")" \
    -timeout=10 -jobs=1 -workers=1 -print_final_stats=1 $(dict "$target") \
    >"$logs/$target.log" 2>&1
  echo "   done in $(($(date +%s) - start)) s; $(grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$logs/$target.log" | tr '\n' ' ')"
done
