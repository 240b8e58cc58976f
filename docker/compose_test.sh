#!/usr/bin/env bash
# `make compose-test`: docker/compose.yaml end to end on this machine.
#
#   1.-3. docker (+ docker-compose v1), the base image, the wheels: docker/lib.sh (shared with
#      swarm_test.sh) says how; dockerd is started when none answers and stopped at the end.
#   4. builds the image (optserve:compose-test) with docker-compose (compose.yaml's build section).
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

TEST=compose-test
IMAGE=${OPTSERVE_IMAGE:-optserve:compose-test}
STATE=${COMPOSE_TEST_STATE:-/tmp/optserve-compose-test}
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
STEPS=${STEPS:-1000}
PROJECT=${COMPOSE_TEST_PROJECT:-optserve-compose-test}

# -- teardown ----------------------------------------------------------------------------------------
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
    finish "$rc" "$([[ ${KEEP:-0} == 1 && $rc -eq 0 ]] && echo 1 || echo 0)"
}
trap teardown EXIT
trap 'exit 130' INT TERM

dc() { docker-compose -p "$PROJECT" "${STACK_FILES[@]}" "$@"; }

# -- 1.-4. docker, base image, wheels, image (docker/lib.sh) -------------------------------------------
need_docker docker-compose:docker-compose
say "docker-compose: $(docker-compose version --short 2>/dev/null || echo '?')"
choose_base
build_wheels
make_token
STACK_FILES=(-f "$D/compose.yaml")
export STEPS OPTSERVE_TOKEN_SECRET=$D/secrets/token
build_image dc build shard0

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
