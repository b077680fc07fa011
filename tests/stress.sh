#!/usr/bin/env bash
# Stress check of the timing-sensitive tests (not part of CI): runs each group ROUNDS times while a CPU hog
# occupies one core, and prints per-test pass counts. The groups: the stop-signal tests, the data-worker fault
# tests, the timing-sensitive distributed (torchrun, 2 gloo processes) tests; `distributed-all` adds the
# DDP equality tests.
#   tests/stress.sh [ROUNDS] [GROUP...]     defaults: 20 rounds, all three groups (signals workers distributed)
# Results (JUnit XML per round, and the summary) go to $STRESS_OUT (default /tmp/loca-stress).
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-20}; shift || true
groups=("$@"); [ ${#groups[@]} -eq 0 ] && groups=(signals workers distributed)
out=${STRESS_OUT:-/tmp/loca-stress}
mkdir -p "$out"
select_group() {  # the pytest arguments of a group
  case $1 in
    signals) command=(tests/test_reliability.py -k "stop_signal or sigterm or stop_during") ;;
    workers) command=(tests/test_faults.py
                      tests/test_reliability.py::test_a_dead_or_hung_data_worker_fails_the_run_with_a_message) ;;
    # the torchrun tests that send signals and kill ranks (the equality tests wait on nothing)
    distributed) command=(tests/test_distributed.py -k "sigterm or elastic") ;;
    distributed-all) command=(tests/test_distributed.py) ;;
    *) echo "unknown group $1 (signals, workers, distributed, distributed-all)" >&2; exit 2 ;;
  esac
}

python3 -c "while True: pass" &   # the hog: one core busy for the whole check
hog=$!
trap 'kill $hog 2>/dev/null' EXIT
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores, one busy (pid $hog)"

for group in "${groups[@]}"; do
  select_group "$group"
  rm -f "$out/$group"-*.xml "$out/$group"-*.log
  start=$(date +%s)
  for round in $(seq 1 "$rounds"); do
    python -m pytest -q -p no:cacheprovider "${command[@]}" --junitxml="$out/$group-$round.xml" \
      >"$out/$group-$round.log" 2>&1
    echo "$group round $round/$rounds: $(tail -1 "$out/$group-$round.log")"
  done
  echo "$group: $rounds rounds in $(( $(date +%s) - start )) s"
done

python - "$out" "${groups[@]}" <<'EOF' | tee "$out/summary.txt"
import collections, sys, xml.etree.ElementTree as ET
from pathlib import Path
out = Path(sys.argv[1])
for group in sys.argv[2:]:
    passed, runs = collections.Counter(), collections.Counter()
    for xml in sorted(out.glob(f"{group}-*.xml")):
        for case in ET.parse(xml).iter("testcase"):
            name = case.get("name")
            if case.find("skipped") is not None:
                continue
            runs[name] += 1
            passed[name] += case.find("failure") is None and case.find("error") is None
    print(f"## {group}")
    for name in sorted(runs):
        print(f"{passed[name]:3d} / {runs[name]:<3d} {name}")
EOF
