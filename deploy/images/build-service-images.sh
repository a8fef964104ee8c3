#!/usr/bin/env bash
# Builds the PostgreSQL and Mosquitto images of the production install (deploy/compose) on the
# local Docker Engine, FROM scratch, from the packages installed on this machine: nothing is
# pulled, so it works without any image registry. Use it where the official images
# (postgres:16, eclipse-mosquitto:2) cannot be pulled; elsewhere use those.
#
#   deploy/images/build-service-images.sh [--postgres-tag T] [--mosquitto-tag T] [--force]
#
# Needs (Debian/Ubuntu): postgresql (any major version), mosquitto, util-linux (setpriv),
# coreutils and dash. Each image holds its programs, the shared libraries `ldd` lists for them
# (at the paths the loader looks for them), their data files, /bin/sh, an /etc/passwd with a
# non-root user, and an entrypoint that behaves like the official image's for what the compose
# file uses:
#   - fledge-postgres: POSTGRES_USER, POSTGRES_DB, POSTGRES_PASSWORD_FILE, PGDATA
#     (default /var/lib/postgresql/data); initialises the cluster on first start with
#     scram-sha-256 for every connection, then runs `postgres` as user postgres (uid 999);
#     `pg_isready` is on PATH.
#   - fledge-mosquitto: /usr/sbin/mosquitto, /usr/bin/mosquitto_ctrl and the dynamic-security
#     plugin at /usr/lib/mosquitto_dynamic_security.so (the official image's paths), user
#     mosquitto (uid 1883), /mosquitto/{config,data,log}.
#
# An image is rebuilt only when its inputs change: the hash of this script and of the installed
# packages' versions is the image's label `fledge.inputs`; an image with the same label is kept
# (prints `up to date`). Prints one line per image: its tag and `built` or `up to date`.
set -euo pipefail

postgres_tag=fledge-postgres:latest
mosquitto_tag=fledge-mosquitto:latest
force=false
while [ $# -gt 0 ]; do
  case "$1" in
    --postgres-tag) postgres_tag=${2:?--postgres-tag needs a value}; shift 2 ;;
    --mosquitto-tag) mosquitto_tag=${2:?--mosquitto-tag needs a value}; shift 2 ;;
    --force) force=true; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "build-service-images: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
done

die() { echo "build-service-images: $*" >&2; exit 1; }
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker daemon reachable (docker info failed)"

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$pg_bin" ] && [ -x "$pg_bin/postgres" ] || die "no PostgreSQL under /usr/lib/postgresql (apt-get install postgresql)"
pg_version=$(basename "$(dirname "$pg_bin")")
mosquitto_bin=/usr/sbin/mosquitto
mosquitto_ctrl=$(command -v mosquitto_ctrl || true)
dynsec=$( (ls /usr/lib/*/mosquitto_dynamic_security.so /usr/lib/mosquitto_dynamic_security.so 2>/dev/null || true) | head -n 1)
for tool in setpriv chown rm dash; do command -v "$tool" >/dev/null || die "$tool is not installed"; done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The package versions an image is made of, plus this script: its input hash.
inputs_of() {
  { sha256sum "$0" | cut -d' ' -f1
    { dpkg-query -W -f '${Package} ${Version}\n' "$@" 2>/dev/null || true; } | sort; } \
    | sha256sum | cut -d' ' -f1
}

# `up to date` when TAG exists with label fledge.inputs = HASH.
current() {
  local tag=$1 hash=$2
  $force && return 1
  [ "$(docker image inspect --format '{{index .Config.Labels "fledge.inputs"}}' "$tag" 2>/dev/null)" = "$hash" ]
}

# Copies FILE (following links) into ROOT at the same path, with every library `ldd` lists
# for it (at the path the loader asks for).
add_with_libs() {
  local root=$1; shift
  local file lib
  for file in "$@"; do
    mkdir -p "$root$(dirname "$file")"
    cp -L "$file" "$root$file"
    if file_is_elf "$file"; then
      while read -r lib; do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
      done < <(libs_of "$file")
    fi
  done
}

file_is_elf() { [ "$(head -c 4 "$1" | od -An -c | tr -d ' \n')" = '177ELF' ]; }

libs_of() {
  ldd "$1" 2>/dev/null | awk '
    /not found/ { print "MISSING " $1; next }
    $2 == "=>" && $3 ~ /^\// { print $3; next }
    $1 ~ /^\// { print $1 }' | while read -r line; do
      case "$line" in MISSING*) die "$1 needs ${line#MISSING } which is not installed" ;; esac
      echo "$line"
    done
}

# The shell and tools the entrypoints use.
add_shell() {
  local root=$1
  add_with_libs "$root" "$(command -v dash)" "$(command -v setpriv)" "$(command -v chown)" "$(command -v rm)"
  mkdir -p "$root/bin"
  cp -L "$(command -v dash)" "$root/bin/sh"
  mkdir -p "$root/tmp" && chmod 1777 "$root/tmp"
}

build() {
  local tag=$1 dir=$2
  docker build --quiet --tag "$tag" "$dir" >/dev/null || die "docker build of $tag failed"
  echo "$tag built"
}

# --- PostgreSQL ----------------------------------------------------------------------------
pg_hash=$(inputs_of "postgresql-$pg_version" libc6 dash util-linux coreutils)
if current "$postgres_tag" "$pg_hash"; then
  echo "$postgres_tag up to date"
else
  root="$work/postgres/rootfs"
  mkdir -p "$root"
  add_shell "$root"
  while IFS= read -r -d '' f; do add_with_libs "$root" "$f"; done \
    < <(find "$pg_bin" "/usr/lib/postgresql/$pg_version/lib" -type f -print0)
  mkdir -p "$root/usr/share/postgresql"
  cp -a "/usr/share/postgresql/$pg_version" "$root/usr/share/postgresql/"
  cp -a /usr/share/zoneinfo "$root/usr/share/"
  mkdir -p "$root/etc" "$root/usr/local/bin"
  printf 'root:x:0:0:root:/root:/sbin/nologin\npostgres:x:999:999:PostgreSQL:/var/lib/postgresql:/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\npostgres:x:999:\n' > "$root/etc/group"
  cat > "$root/usr/local/bin/docker-entrypoint.sh" <<'SH'
#!/bin/sh
# fledge-postgres's entrypoint: initialise the cluster once, then run postgres as uid 999.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGDATA
if [ "$(/usr/bin/setpriv --dump 2>/dev/null | while read -r k v; do [ "$k" = "uid:" ] && echo "$v"; done)" = 0 ]; then
  # Root: make the data directory postgres's, read the secret while still root, then drop.
  mkdir_p() { [ -d "$1" ] || { echo "fledge-postgres: $1 is missing" >&2; exit 1; }; }
  mkdir_p "$PGDATA"
  chown 999:999 "$PGDATA" /var/run/postgresql
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    file=${POSTGRES_PASSWORD_FILE:-}
    if [ -z "$file" ] || [ ! -s "$file" ]; then
      echo "fledge-postgres: POSTGRES_PASSWORD_FILE must name a non-empty file (the superuser's password)" >&2
      exit 64
    fi
    IFS= read -r password < "$file" || true
    [ -n "$password" ] || { echo "fledge-postgres: $file: the first line is empty" >&2; exit 64; }
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    # initdb reads the password from a file that only uid 999 can read, removed at once.
    pwfile=/tmp/.pgpass.$$
    (umask 077 && printf '%s\n' "$password" > "$pwfile")
    chown 999:999 "$pwfile"
    setpriv --reuid=999 --regid=999 --clear-groups \
      initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth=scram-sha-256 \
        --encoding=UTF8 --locale=C >/dev/null || { rm -f "$pwfile"; exit 1; }
    rm -f "$pwfile"
    printf 'host all all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
      printf 'CREATE DATABASE "%s" OWNER "%s";\n' "$db" "$user" \
        | setpriv --reuid=999 --regid=999 --clear-groups postgres --single -D "$PGDATA" postgres >/dev/null
    fi
    echo "fledge-postgres: initialised $PGDATA (user $user, database $db)" >&2
  fi
  exec setpriv --reuid=999 --regid=999 --clear-groups "$0" "$@"
fi
[ -s "$PGDATA/PG_VERSION" ] || { echo "fledge-postgres: $PGDATA is not initialised; start the container as root once" >&2; exit 1; }
if [ $# -eq 0 ] || [ "$1" = postgres ]; then
  [ $# -gt 0 ] && shift
  exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
SH
  chmod 755 "$root/usr/local/bin/docker-entrypoint.sh"
  mkdir -p "$work/postgres/owned/var/lib/postgresql/data" "$work/postgres/owned/var/run/postgresql"
  chmod 700 "$work/postgres/owned/var/lib/postgresql/data"
  chmod 2775 "$work/postgres/owned/var/run/postgresql"
  cat > "$work/postgres/Dockerfile" <<DF
FROM scratch
COPY rootfs/ /
COPY --chown=999:999 owned/ /
ENV PATH=$pg_bin:/usr/local/bin:/usr/bin:/bin PGDATA=/var/lib/postgresql/data TZ=UTC
LABEL fledge.image=postgres fledge.inputs=$pg_hash
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
DF
  build "$postgres_tag" "$work/postgres"
fi

# --- Mosquitto -----------------------------------------------------------------------------
[ -x "$mosquitto_bin" ] && [ -n "$mosquitto_ctrl" ] && [ -n "$dynsec" ] \
  || die "mosquitto, mosquitto_ctrl or its dynamic-security plugin is missing (apt-get install mosquitto)"
mq_hash=$(inputs_of mosquitto mosquitto-clients libmosquitto1 libc6 dash util-linux coreutils)
if current "$mosquitto_tag" "$mq_hash"; then
  echo "$mosquitto_tag up to date"
else
  root="$work/mosquitto/rootfs"
  mkdir -p "$root"
  add_shell "$root"
  add_with_libs "$root" "$mosquitto_bin" "$mosquitto_ctrl" "$dynsec"
  if [ "$dynsec" != /usr/lib/mosquitto_dynamic_security.so ]; then
    cp -L "$dynsec" "$root/usr/lib/mosquitto_dynamic_security.so"
  fi
  mkdir -p "$root/etc"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nmosquitto:x:1883:1883:Mosquitto:/mosquitto:/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\nmosquitto:x:1883:\n' > "$root/etc/group"
  mkdir -p "$work/mosquitto/owned/mosquitto/config" "$work/mosquitto/owned/mosquitto/data" \
    "$work/mosquitto/owned/mosquitto/log"
  printf 'listener 1883 127.0.0.1\nallow_anonymous false\n' > "$work/mosquitto/owned/mosquitto/config/mosquitto.conf"
  cat > "$work/mosquitto/Dockerfile" <<DF
FROM scratch
COPY rootfs/ /
COPY --chown=1883:1883 owned/ /
ENV PATH=/usr/sbin:/usr/bin:/bin
LABEL fledge.image=mosquitto fledge.inputs=$mq_hash
VOLUME /mosquitto/data
EXPOSE 1883 8883
USER 1883:1883
CMD ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
DF
  build "$mosquitto_tag" "$work/mosquitto"
fi
