#!/usr/bin/env bash
# `make compose-test`: docker/compose.yaml end to end on this machine.
#
#   1. docker: installs docker.io + docker-compose (v1) from Debian's packages when missing, and starts
#      dockerd when none answers (that one, and only that one, is stopped at the end).
#   2. base image: python:3.11-slim-bookworm when it is here or can be pulled; else a Debian bookworm
#      debootstrapped from the mirror apt uses and `docker import`ed as optserve-base:bookworm (kept:
#      the next run reuses it). BASE_IMAGE=... skips this step.
#   3. wheels: the optserve wheel is built from this tree into docker/dist/; its dependencies (torch
#      per TORCH_SPEC, CPU) are downloaded on the host into docker/wheels/ for the image's python
#      (kept until pyproject's dependencies, TORCH_SPEC or that python change). The image installs
#      from them only (PIP_NO_INDEX=1): builds here cannot verify TLS.
#   4. builds the image (optserve:compose-test) with docker-compose.
#   5. runs the stack (2 shards, token as a compose secret, 2 workers); when a worker is STEPS/4 steps
#      in, restarts shard1 and requires it to restore the checkpoint its SIGTERM wrote ("restored
#      checkpoint ..." in its log) while the workers still train; requires both workers to exit 0
#      (served model >= 90% held-out accuracy), shard1's key to end at exactly 2 x STEPS Adam steps
#      (nothing lost or repeated across the restart), and a call without the token to be refused.
#   6. runs it again with compose.tls.yaml (mutual TLS, certificates from the one-shot `certs`
#      service) and requires both workers to exit 0 (COMPOSE_TEST_TLS=0 skips this).
#   7. tears everything down (containers, network, volumes; images and caches stay). KEEP=1 leaves
#      the last stack up for a look.
#
# About 1-1.5 minutes warm (image, base and wheels cached; a code change rebuilds in ~5 s); about
# 3.5 minutes cold here (docker install ~25 s, debootstrap + import ~55 s, wheels ~15 s, build ~60 s).
# Environment: BASE_IMAGE, TORCH_SPEC, STEPS (1000), TLS_STEPS (250), COMPOSE_TEST_TLS (1), KEEP (0).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
D=$ROOT/docker

DEFAULT_BASE=python:3.11-slim-bookworm
LOCAL_BASE=optserve-base:bookworm
IMAGE=${OPTSERVE_IMAGE:-optserve:compose-test}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=demo
STEPS=${STEPS:-1000}
PROJECT=${COMPOSE_TEST_PROJECT:-optserve-compose-test}
STATE=${COMPOSE_TEST_STATE:-/tmp/optserve-compose-test}
T0=$SECONDS

say() { printf '[compose-test %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { say "FAILED: $*"; exit 1; }
mkdir -p "$STATE"

# -- teardown ----------------------------------------------------------------------------------------
DOCKERD_PID=""
ROOTFS=""
STACK_FILES=()
teardown() {
    local rc=$?
    set +e
    if [[ ${#STACK_FILES[@]} -gt 0 ]]; then
        if [[ $rc -ne 0 ]]; then
            say "logs of the failed stack (last 40 lines each):"
            dc logs --no-color --tail=40 2>&1 | sed 's/^/    /'
        fi
        if [[ ${KEEP:-0} == 1 && $rc -eq 0 ]]; then
            say "KEEP=1: stack left up: docker-compose -p $PROJECT ${STACK_FILES[*]} down -v"
        else
            dc down -v --remove-orphans --timeout 20 >/dev/null 2>&1
            say "stack removed (containers, network, volumes)"
        fi
    fi
    if [[ -n $ROOTFS && -d $ROOTFS ]]; then
        findmnt -R -n -o TARGET "$ROOTFS" 2>/dev/null | sort -r | xargs -r -n1 umount -l
        rm -rf --one-file-system "$ROOTFS"
    fi
    if [[ -n $DOCKERD_PID && ${KEEP:-0} == 1 && $rc -eq 0 ]]; then
        say "KEEP=1: the dockerd this run started (pid $DOCKERD_PID) keeps running"
    elif [[ -n $DOCKERD_PID ]]; then
        kill "$DOCKERD_PID" 2>/dev/null && for _ in $(seq 40); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        say "stopped the dockerd this run started (pid $DOCKERD_PID)"
    fi
    if [[ $rc -eq 0 ]]; then say "PASSED in $((SECONDS - T0)) s"; else say "FAILED (exit $rc) after $((SECONDS - T0)) s"; fi
}
trap teardown EXIT
trap 'exit 130' INT TERM

dc() { docker-compose -p "$PROJECT" "${STACK_FILES[@]}" "$@"; }

# -- 1. docker -----------------------------------------------------------------------------------------
apt_install() {
    [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || die "need $*: install them (Debian: apt-get install $*)"
    say "installing $* from Debian's packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$STATE/apt.log" 2>&1 \
        || { tail -20 "$STATE/apt.log"; die "apt-get install $*"; }
}
missing=()
command -v docker >/dev/null || missing+=(docker.io)
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v iptables >/dev/null || missing+=(iptables)
[[ ${#missing[@]} -eq 0 ]] || apt_install $(printf '%s\n' "${missing[@]}" | sort -u)
say "docker-compose: $(docker-compose version --short 2>/dev/null || echo '?')"

if ! docker info >/dev/null 2>&1; then
    say "no docker daemon answers: starting dockerd (log: $STATE/dockerd.log)"
    dockerd >"$STATE/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 "$STATE/dockerd.log"; die "dockerd did not start"; }
fi
say "docker daemon $(docker version --format '{{.Server.Version}}' 2>/dev/null)"

# -- 2. base image ---------------------------------------------------------------------------------------
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
debian_mirror() {
    local uri=""
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z $uri && -f /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}
if [[ -n ${BASE_IMAGE:-} ]]; then
    base=$BASE_IMAGE
    have_image "$base" || docker pull "$base" >/dev/null || die "base image $base: not here and cannot be pulled"
    say "base image $base (BASE_IMAGE)"
elif have_image "$DEFAULT_BASE"; then
    base=$DEFAULT_BASE; say "base image $base (here)"
elif have_image "$LOCAL_BASE"; then
    base=$LOCAL_BASE; say "base image $base (debootstrapped earlier, cached)"
elif timeout 60 docker pull "$DEFAULT_BASE" >"$STATE/pull.log" 2>&1; then
    base=$DEFAULT_BASE; say "base image $base (pulled)"
else
    say "cannot pull $DEFAULT_BASE ($(tail -1 "$STATE/pull.log" | cut -c1-100)); debootstrapping a bookworm base"
    command -v debootstrap >/dev/null || apt_install debootstrap
    mirror=$(debian_mirror)
    ROOTFS=$(mktemp -d /var/tmp/optserve-rootfs.XXXXXX)
    t=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,openssl,ca-certificates \
        bookworm "$ROOTFS" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -20 "$STATE/debootstrap.log"; die "debootstrap from $mirror"; }
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase bookworm ($mirror) for optserve" - "$LOCAL_BASE" >/dev/null
    findmnt -R -n -o TARGET "$ROOTFS" 2>/dev/null | sort -r | xargs -r -n1 umount -l || true
    rm -rf --one-file-system "$ROOTFS"; ROOTFS=""
    base=$LOCAL_BASE
    say "base image $base: debootstrapped from $mirror and imported in $((SECONDS - t)) s ($(docker image inspect -f '{{.Size}}' "$base" | awk '{printf "%.0f MB", $1/1e6}'))"
fi
pyver=$(docker run --rm --entrypoint python3 "$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    || die "$base has no python3"
HOSTPY=$(command -v "python$pyver" || true)
[[ -n $HOSTPY ]] || die "the image's python is $pyver: the wheels are downloaded with the host's python$pyver, which is missing"
say "image python $pyver; wheels come from $HOSTPY"

# -- 3. wheels -------------------------------------------------------------------------------------------
t=$SECONDS
src=$(mktemp -d "$STATE/src.XXXXXX")
cp -r "$ROOT"/pyproject.toml "$ROOT"/README.md "$ROOT"/optserve "$ROOT"/server "$ROOT"/client "$ROOT"/proto "$src"/
find "$src" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$D/dist"
SOURCE_DATE_EPOCH=315532800 "$HOSTPY" -m pip wheel -q --no-deps -w "$D/dist" "$src" >"$STATE/wheel.log" 2>&1 \
    || { tail -20 "$STATE/wheel.log"; die "building the optserve wheel"; }
rm -rf "$src"
wheel=$(ls "$D"/dist/optserve-*.whl)
say "built $(basename "$wheel") from this tree in $((SECONDS - t)) s"

# optserve's dependencies (with the extras) from pyproject.toml: the cache key of docker/wheels, and
# wheels/requirements.txt, which the image installs in the torch layer (cached across code changes).
reqs=$("$HOSTPY" - "$ROOT/pyproject.toml" "$EXTRAS" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project.get("dependencies", []) + project.get("optional-dependencies", {}).get(sys.argv[2], [])))
EOF
)
key=$(printf '%s\n' "$reqs" "$TORCH_SPEC" "$EXTRAS" "$pyver" | sha256sum | cut -c1-16)
mkdir -p "$D/wheels"
if [[ -f $D/wheels/.key && $(cat "$D/wheels/.key") == "$key" ]]; then
    say "dependency wheels cached in docker/wheels ($(ls "$D"/wheels/*.whl | wc -l) wheels, key $key)"
else
    t=$SECONDS
    say "downloading dependency wheels into docker/wheels (key $key)"
    rm -f "$D/wheels/.key"
    "$HOSTPY" -m pip download -q --only-binary=:all: -d "$D/wheels" "$TORCH_SPEC" "$wheel[$EXTRAS]" \
        >"$STATE/download.log" 2>&1 || { tail -20 "$STATE/download.log"; die "pip download"; }
    rm -f "$D"/wheels/optserve-*.whl
    printf '%s\n' "$TORCH_SPEC" "$reqs" >"$D/wheels/requirements.txt"
    echo "$key" >"$D/wheels/.key"
    say "downloaded $(ls "$D"/wheels/*.whl | wc -l) wheels ($(du -sh "$D/wheels" | cut -f1)) in $((SECONDS - t)) s"
fi
torch_whl=$(ls "$D"/wheels/torch-*.whl 2>/dev/null | head -1)
[[ -n $torch_whl ]] || die "no torch wheel in docker/wheels"
if [[ $TORCH_SPEC == "torch==2.13.0" ]]; then
    [[ $torch_whl == *+cpu* ]] || die "$(basename "$torch_whl") is not the CPU build"
    ! ls "$D"/wheels/nvidia_* >/dev/null 2>&1 || die "CUDA wheels (nvidia_*) in docker/wheels: expected the CPU torch"
fi
say "torch: $(basename "$torch_whl") ($(du -h "$torch_whl" | cut -f1))"

# -- 4. image --------------------------------------------------------------------------------------------
STACK_FILES=(-f "$D/compose.yaml")
mkdir -p "$D/secrets"
chmod 700 "$D/secrets"
if [[ ! -s $D/secrets/token ]]; then
    (umask 077; "$HOSTPY" -c 'import secrets; print(secrets.token_hex(32))' >"$D/secrets/token")
    say "made a token: docker/secrets/token"
fi
chmod 644 "$D/secrets/token"  # the shards and workers run as uid 10001; the folder stays 0700
export OPTSERVE_IMAGE=$IMAGE BASE_IMAGE=$base PIP_NO_INDEX=1 TORCH_SPEC STEPS
export OPTSERVE_TOKEN_SECRET=$D/secrets/token
t=$SECONDS
dc build shard0 >"$STATE/build.log" 2>&1 || { tail -30 "$STATE/build.log"; die "docker-compose build"; }
say "image $IMAGE built on $base in $((SECONDS - t)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'); log $STATE/build.log)"
say "in the image: $(docker run --rm --entrypoint sh "$IMAGE" -c 'echo "user $(id -un), $(optserve --version), torch $(python -c "import torch; print(torch.__version__)")"')"

# -- 5./6. the stack ---------------------------------------------------------------------------------------
container() { dc ps -q "$1"; }
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1"; }
running() { [[ $(docker inspect -f '{{.State.Running}}' "$1") == true ]]; }
shard1_stats() {  # "<sum of shard1's key versions (Adam steps applied)> <pushes since its start> <data channel calls>"
    dc exec -T shard1 optserve --log-level WARNING status --json --token-file /run/secrets/optserve_token \
        localhost:50051 | "$HOSTPY" -c 'import json, sys; [s] = json.load(sys.stdin); print(sum(k["version"] for k in s["keys"]), s["pushes"], s["data_calls"])'
}
wait_workers() {  # both workers exited 0 with the accuracy line, within $1 s
    local ids code w out line
    ids=$(container worker0; container worker1)
    out=$(timeout "$1" docker wait $ids) || die "workers still running after $1 s"
    mapfile -t codes <<<"$out"
    for w in 0 1; do
        code=${codes[$w]:-?}
        line=$(docker logs "$(container "worker$w")" 2>&1 | grep -E "^worker $w: (OK|FAILED)" | tail -1 || true)
        say "  worker$w exit $code: ${line:-no result line}"
        [[ $code == 0 && $line == *": OK:"* ]] || die "worker$w did not reach the accuracy target"
    done
}

say "stack 1: 2 shards + 2 workers, token secret, plaintext on the compose network; $STEPS steps per worker"
t=$SECONDS
dc up -d --no-build >"$STATE/up.log" 2>&1 || { cat "$STATE/up.log"; die "docker-compose up"; }
say "  shards healthy, workers started ($((SECONDS - t)) s)"
w0=$(container worker0); w1=$(container worker1); s1=$(container shard1)
docker logs "$s1" 2>&1 | grep -m1 "serving on" | sed 's/^.* INFO /  shard1: /' || true

# Restart shard1 while the workers train: SIGTERM (through init) writes a final checkpoint; at start
# the shard restores it; the workers' RemoteAdam waits for the shard and retries (exactly once).
restart_at=$((STEPS / 4))
for _ in $(seq 600); do
    step=$( { docker logs "$w0"; docker logs "$w1"; } 2>&1 | sed -n 's/^worker [01]: step \([0-9]*\)\/.*/\1/p' | sort -n | tail -1)
    [[ ${step:-0} -ge $restart_at ]] && break
    sleep 0.2
done
[[ ${step:-0} -ge $restart_at ]] || die "workers did not reach step $restart_at"
# Every worker step needs shard1, so a restart begun while both workers run is a restart mid-run: they
# cannot finish while it is down. Whether they are still running when its health check next reports
# is a race (they finish the remaining steps in a few seconds), so it is not asked; the pushes shard1
# counts after its restart (> 0, required below) show that they went on against the restored shard.
running "$w0" && running "$w1" || die "a worker finished before step $restart_at of $STEPS: not a restart mid-run (raise STEPS)"
say "  a worker is at step $step of $STEPS: restarting shard1 (docker restart: SIGTERM, then start)"
t=$SECONDS
docker restart -t 30 "$s1" >/dev/null
for _ in $(seq 120); do [[ $(health "$s1") == healthy ]] && break; sleep 0.5; done
[[ $(health "$s1") == healthy ]] || die "shard1 not healthy after its restart"
logs=$(docker logs "$s1" 2>&1)
final=$(sed -n '/restored checkpoint/q; /checkpoint \/data\/\S*: [0-9]* keys/p' <<<"$logs" | tail -1)
restored=$(grep -m1 "restored checkpoint" <<<"$logs") || die "shard1's log has no 'restored checkpoint' line"
say "  shard1 back and healthy in $((SECONDS - t)) s:"
say "    at SIGTERM: ${final#* INFO }"
say "    at start:   ${restored#* INFO }"
ckpt_final=$(grep -o '/data/ckpt-[0-9]*' <<<"$final" || true)
ckpt_restored=$(grep -o '/data/ckpt-[0-9]*' <<<"$restored")
[[ -n $ckpt_final && $ckpt_final == "$ckpt_restored" ]] || die "shard1 did not restore the checkpoint its SIGTERM wrote"

wait_workers 300
read -r versions pushes data_calls <<<"$(shard1_stats)"
say "  shard1 at the end: its key went through $versions Adam steps (2 workers x $STEPS steps: none lost or"
say "    repeated across the restart), $pushes of them pushed after the restart"
[[ $versions == $((2 * STEPS)) ]] || die "shard1's key has $versions steps, expected $((2 * STEPS))"
[[ $pushes -gt 0 ]] || die "no push reached shard1 after its restart"
say "  $data_calls calls since the restart came over shard1's data channel (port 50052)"
[[ $data_calls -ge $pushes ]] || die "the workers' pushes did not use the data channel ($data_calls calls, $pushes pushes)"
refused=$(dc exec -T shard0 optserve --log-level WARNING status localhost:50051 2>&1 || true)
[[ $refused == *UNAUTHENTICATED* ]] || die "a call without the token was not refused: $refused"
say "  a call without the token: refused (UNAUTHENTICATED)"
say "  optserve status:"
dc exec -T shard0 optserve --log-level WARNING status --token-file /run/secrets/optserve_token \
    shard0:50051 shard1:50051 | grep -E "^[a-z0-9]+:[0-9]+: shard|keys [0-9]+|staleness:" | sed 's/^/      /'
say "stack 1 passed in $((SECONDS - t)) s after the restart"
dc down -v --remove-orphans --timeout 20 >/dev/null 2>&1

if [[ ${COMPOSE_TEST_TLS:-1} == 1 ]]; then
    STACK_FILES=(-f "$D/compose.yaml" -f "$D/compose.tls.yaml")
    export STEPS=${TLS_STEPS:-250}
    say "stack 2: the same with compose.tls.yaml (mutual TLS + token); $STEPS steps per worker"
    t=$SECONDS
    dc up -d --no-build >"$STATE/up-tls.log" 2>&1 || { cat "$STATE/up-tls.log"; die "docker-compose up (TLS)"; }
    say "  $(dc logs --no-color certs | grep -m1 make_certs | sed 's/^[^|]*| //')"
    logs=$(docker logs "$(container shard0)" 2>&1)
    grep -m1 "serving on" <<<"$logs" | sed 's/^.* INFO /  shard0: /' || true
    [[ $logs == *"mutual TLS"* ]] || die "shard0 does not serve mutual TLS"
    [[ $logs == *"data channel on port 50052"* ]] || die "shard0 has no data channel under TLS"
    wait_workers 300
    say "stack 2 passed in $((SECONDS - t)) s"
fi
