# shellcheck shell=bash
# Sourced by scripts/local-up.sh and scripts/lib/pg.sh: where the PostgreSQL programs are.

# find_pg_bindir TOOL...: the directory holding every TOOL (e.g. initdb postgres psql): from
# PATH (symlinks resolved: some machines link only initdb/postgres into /usr/local/bin),
# pg_config, or Debian's layout (the newest version when several are installed).
find_pg_bindir() {
  local d tool ok candidates=()
  command -v initdb >/dev/null 2>&1 && candidates+=("$(dirname "$(readlink -f "$(command -v initdb)")")")
  command -v pg_config >/dev/null 2>&1 && candidates+=("$(pg_config --bindir)")
  while read -r d; do candidates+=("$(dirname "$d")"); done < <(compgen -G "/usr/lib/postgresql/*/bin/initdb" | sort -rV)
  for d in "${candidates[@]}"; do
    ok=1
    for tool in "$@"; do [ -x "$d/$tool" ] || ok=0; done
    [ "$ok" = 1 ] && { echo "$d"; return 0; }
  done
  return 1
}
