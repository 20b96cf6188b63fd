#!/usr/bin/env bash
# The whole suite, as `make test` runs it: the reliability scenarios
# (tests/reliability: mostly real time spent waiting, a 60 s freeze and
# minutes of steady load among them), with the benchmark smoke test and the
# hostile-broker tests to even the halves, in one pytest process, beside
# everything else in another, so that the suite's wall time is the longer of
# the two rather than their sum. They share nothing that matters: each
# process has its own scratch databases (db_dsn is named for its pid) and
# the scenarios start their own brokers. Both must pass; pytest's "no tests
# ran" (exit 5) fails too. Arguments go to both.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-.venv/bin/pytest}
BESIDE=(tests/reliability tests/test_bench_smoke.py tests/test_hostile_broker.py)
ignore=()
for path in "${BESIDE[@]}"; do ignore+=("--ignore=$path"); done
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$PYTEST" "${BESIDE[@]}" "$@" >"$log" 2>&1 &
scenarios=$!
"$PYTEST" "${ignore[@]}" "$@"
rest=$?
wait "$scenarios"
reliability=$?
echo
echo "=== ${BESIDE[*]} (run beside the rest) ==="
cat "$log"
echo "=== pytest exit statuses: the rest $rest, beside it $reliability"
if [ "$rest" -ne 0 ]; then exit "$rest"; fi
exit "$reliability"
