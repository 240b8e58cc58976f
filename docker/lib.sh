# What docker/compose_test.sh and docker/swarm_test.sh share; sourced by both, not run by itself.
#
# The sourcing script sets TEST (its name in messages), STATE (a folder for logs) and IMAGE (the image
# to build), sets `trap ... EXIT` to a teardown of its own that ends with `finish $rc`, then calls:
#   need_docker [command:package ...]  1. docker: installs docker.io (+ the packages named) from Debian's
#                                      packages when missing; starts dockerd when none answers (that
#                                      one, and only that one, is stopped by `finish`).
#   choose_base                        2. base image: BASE_IMAGE when set; else python:3.11-slim-bookworm
#                                      when here or pullable; else a Debian bookworm debootstrapped from
#                                      the mirror apt uses and `docker import`ed as optserve-base:bookworm
#                                      (kept: the next run reuses it). Sets base, pyver and HOSTPY (the
#                                      host's python of the image's version).
#   build_wheels                       3. the optserve wheel from this tree into docker/dist/; its
#                                      dependencies (torch per TORCH_SPEC, CPU) downloaded on the host into
#                                      docker/wheels/ (kept until pyproject's dependencies, TORCH_SPEC or
#                                      the python change). The image installs from them only
#                                      (PIP_NO_INDEX=1): builds here cannot verify TLS.
#   make_token                         docker/secrets/token (kept), made when missing.
#   build_image [command ...]          4. builds IMAGE from docker/ (docker build; or the command given,
#                                      e.g. docker-compose build, with the same variables exported).
# Environment: BASE_IMAGE, TORCH_SPEC (torch==2.13.0).

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=$ROOT/docker
DEFAULT_BASE=python:3.11-slim-bookworm
LOCAL_BASE=optserve-base:bookworm
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=demo
T0=$SECONDS
DOCKERD_PID=""
ROOTFS=""

say() { printf '[%s %4ds] %s\n' "$TEST" "$((SECONDS - T0))" "$*"; }
die() { say "FAILED: $*"; exit 1; }
mkdir -p "$STATE"

# The end of every teardown: a half-made rootfs, the dockerd this run started (kept when $2 is 1),
# and the verdict.
finish() {
    local rc=$1 keep_dockerd=${2:-0}
    if [[ -n $ROOTFS && -d $ROOTFS ]]; then
        findmnt -R -n -o TARGET "$ROOTFS" 2>/dev/null | sort -r | xargs -r -n1 umount -l
        rm -rf --one-file-system "$ROOTFS"
    fi
    if [[ -n $DOCKERD_PID && $keep_dockerd == 1 ]]; then
        say "KEEP=1: the dockerd this run started (pid $DOCKERD_PID) keeps running"
    elif [[ -n $DOCKERD_PID ]]; then
        kill "$DOCKERD_PID" 2>/dev/null && for _ in $(seq 40); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        say "stopped the dockerd this run started (pid $DOCKERD_PID)"
    fi
    if [[ $rc -eq 0 ]]; then say "PASSED in $((SECONDS - T0)) s"; else say "FAILED (exit $rc) after $((SECONDS - T0)) s"; fi
}

apt_install() {
    [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null || die "need $*: install them (Debian: apt-get install $*)"
    say "installing $* from Debian's packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >"$STATE/apt.log" 2>&1 \
        || { tail -20 "$STATE/apt.log"; die "apt-get install $*"; }
}

need_docker() {
    local missing=() pair
    command -v docker >/dev/null || missing+=(docker.io)
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v iptables >/dev/null || missing+=(iptables)
    for pair in "$@"; do command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}"); done
    [[ ${#missing[@]} -eq 0 ]] || apt_install $(printf '%s\n' "${missing[@]}" | sort -u)
    if ! docker info >/dev/null 2>&1; then
        say "no docker daemon answers: starting dockerd (log: $STATE/dockerd.log)"
        dockerd >"$STATE/dockerd.log" 2>&1 &
        DOCKERD_PID=$!
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        docker info >/dev/null 2>&1 || { tail -20 "$STATE/dockerd.log"; die "dockerd did not start"; }
    fi
    say "docker daemon $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
}

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

choose_base() {
    local t mirror
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
}

build_wheels() {
    local t src wheel reqs key torch_whl
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
    reqs=$("$HOSTPY" - "$ROOT/pyproject.toml" "$EXTRAS" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project.get("dependencies", []) + project.get("optional-dependencies", {}).get(sys.argv[2], [])))
PY
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
}

make_token() {
    mkdir -p "$D/secrets"
    chmod 700 "$D/secrets"
    if [[ ! -s $D/secrets/token ]]; then
        (umask 077; "$HOSTPY" -c 'import secrets; print(secrets.token_hex(32))' >"$D/secrets/token")
        say "made a token: docker/secrets/token"
    fi
    chmod 644 "$D/secrets/token"  # compose mounts the file as is: uid 10001 reads it; the folder stays 0700
}

build_image() {
    local t
    export OPTSERVE_IMAGE=$IMAGE BASE_IMAGE=$base PIP_NO_INDEX=1 TORCH_SPEC
    t=$SECONDS
    if [[ $# -eq 0 ]]; then
        set -- docker build -t "$IMAGE" --build-arg BASE_IMAGE="$base" --build-arg PIP_NO_INDEX=1 \
            --build-arg TORCH_SPEC="$TORCH_SPEC" "$D"
    fi
    "$@" >"$STATE/build.log" 2>&1 || { tail -30 "$STATE/build.log"; die "$1 build"; }
    say "image $IMAGE built on $base in $((SECONDS - t)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'); log $STATE/build.log)"
    say "in the image: $(docker run --rm --entrypoint sh "$IMAGE" -c 'echo "user $(id -un), $(optserve --version), torch $(python -c "import torch; print(torch.__version__)")"')"
}
