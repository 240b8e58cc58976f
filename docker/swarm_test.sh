#!/usr/bin/env bash
# `make swarm-test`: docker/stack.yaml end to end on a single-node Docker Swarm on this machine.
#
#   1.-4. docker, the base image, the wheels and the image (optserve:swarm-test, `docker build`):
#      docker/lib.sh, shared with compose_test.sh; dockerd is started when none answers.
#   5. swarm: a node in no swarm gets `docker swarm init` on loopback (and leaves it at the end); a
#      node already in one is used as it is.
#   6. deploys the stack (2 shards, 2 workers, the token as a Swarm secret, dnsrr endpoints). When a
#      worker is STEPS/4 steps in, stops shard-1's task container as Swarm stops a task (docker kill
#      --signal TERM: the shard finishes the calls in flight and writes its final checkpoint; a
#      SIGKILL would lose the pushes since the last periodic one, README "Durability"). Swarm starts a
#      new task, at a new address under the same name, which restores that checkpoint. Requires:
#      - the new task's address differs from the old one's, and it restored the old one's last checkpoint;
#      - each worker resumes within RESUME_LIMIT (5) s of the new shard's health turning healthy: its
#        first step line after the old task died (docker logs --timestamps) against the new task's
#        first passing health check (docker events; the probe is `optserve health`, every 2 s);
#      - both workers exit 0 (served model >= 90% held-out accuracy);
#      - every key on both shards went through exactly as many Adam steps as the workers pushed it
#        (their "pushed every key N times, 0 dropped" lines): nothing lost or applied twice;
#      - a call without the token is refused.
#   7. saves every task's log in $STATE/logs (the workers' at INFO: each retry), then tears down
#      what it made: the stack (services, secret, network), its volumes, the swarm if it made it, the
#      dockerd if it started it. KEEP=1 leaves the stack (and swarm, dockerd) up.
#
# Cost: see README ("Docker Swarm"). Environment: BASE_IMAGE, TORCH_SPEC, STEPS (1000),
# RESUME_LIMIT (5), KEEP (0).
set -euo pipefail

TEST=swarm-test
IMAGE=${OPTSERVE_IMAGE:-optserve:swarm-test}
STATE=${SWARM_TEST_STATE:-/tmp/optserve-swarm-test}
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
STEPS=${STEPS:-1000}
RESUME_LIMIT=${RESUME_LIMIT:-5}
STACK=${SWARM_TEST_STACK:-optserve-swarm-test}

# -- teardown ----------------------------------------------------------------------------------------
DEPLOYED=0
SWARM_CREATED=0
GWBRIDGE_BEFORE=1
keep() { [[ ${KEEP:-0} == 1 && $1 -eq 0 ]]; }
teardown() {
    local rc=$?
    set +e
    if [[ $DEPLOYED == 1 ]]; then
        mkdir -p "$STATE/logs"; rm -f "$STATE"/logs/*.log
        for c in $(docker ps -aq --filter "label=com.docker.stack.namespace=$STACK"); do
            docker logs -t "$c" >"$STATE/logs/$(docker inspect -f '{{.Name}}' "$c" | cut -c2-).log" 2>&1
        done
        if [[ $rc -ne 0 ]]; then
            say "logs of the failed stack (every task's in $STATE/logs; here the last 15 lines of each, step lines left out):"
            for f in "$STATE"/logs/*.log; do
                grep -v ": step [0-9]*/" "$f" | tail -15 | sed "s|^|    $(basename "$f" .log | cut -d. -f1-2): |"
            done
        fi
        if keep "$rc"; then
            say "KEEP=1: stack left up: docker stack rm $STACK; docker volume rm ${STACK}_shard-0-data ${STACK}_shard-1-data"
        else
            docker stack rm "$STACK" >/dev/null 2>&1
            for _ in $(seq 120); do
                [[ -z $(docker ps -aq --filter "label=com.docker.stack.namespace=$STACK") ]] && break; sleep 0.5
            done
            docker volume ls -q --filter "label=com.docker.stack.namespace=$STACK" | xargs -r docker volume rm >/dev/null
            say "stack removed (services, secret, network, volumes)"
        fi
    fi
    if [[ $SWARM_CREATED == 1 ]] && ! keep "$rc"; then
        docker swarm leave --force >/dev/null 2>&1
        for _ in $(seq 20); do docker network rm docker_gwbridge >/dev/null 2>&1 && break; [[ $GWBRIDGE_BEFORE == 1 ]] && break; sleep 0.5; done
        say "left the swarm this run made"
    fi
    finish "$rc" "$(keep "$rc" && echo 1 || echo 0)"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# -- 1.-4. docker, base image, wheels, image (docker/lib.sh) -------------------------------------------
need_docker
choose_base
build_wheels
make_token
build_image

# -- 5. swarm --------------------------------------------------------------------------------------------
node=$(docker info -f '{{.Swarm.LocalNodeState}}')
case $node in
    inactive)
        docker network inspect docker_gwbridge >/dev/null 2>&1 || GWBRIDGE_BEFORE=0
        docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 >"$STATE/swarm-init.log" 2>&1 \
            || { cat "$STATE/swarm-init.log"; die "docker swarm init"; }
        SWARM_CREATED=1
        say "made a single-node swarm on 127.0.0.1 (left at the end)" ;;
    active)
        [[ $(docker info -f '{{.Swarm.ControlAvailable}}') == true ]] || die "this node is a swarm worker: run on a manager"
        say "this node is already a swarm manager: using its swarm (left as it is)" ;;
    *) die "swarm state '$node': expected inactive or active" ;;
esac

# -- 6. the stack ----------------------------------------------------------------------------------------
tasks() { docker ps -aq --no-trunc --filter "label=com.docker.swarm.service.name=${STACK}_$1"; }
address() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' "$1" | xargs; }
health() { docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1"; }
running() { [[ $(docker inspect -f '{{.State.Running}}' "$1") == true ]]; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll every 0.5 s
    local seconds=$1 what=$2; shift 2
    for _ in $(seq $((seconds * 2))); do "$@" && return 0; sleep 0.5; done
    die "$what: not within $seconds s"
}
one_task() { [[ $(tasks "$1" | wc -l) -ge 1 ]]; }

say "stack $STACK: 2 shards + 2 workers, token as a Swarm secret, dnsrr; $STEPS steps per worker"
t=$SECONDS
DEPLOYED=1  # from here on, teardown removes what stack deploy made, even half of it
OPTSERVE_IMAGE=$IMAGE OPTSERVE_TOKEN_SECRET=$D/secrets/token STEPS=$STEPS PROGRESS_EVERY=1 CONNECT_TIMEOUT=180 LOG_LEVEL=INFO \
    docker stack deploy --resolve-image never --detach=true -c "$D/stack.yaml" "$STACK" >"$STATE/deploy.log" 2>&1 \
    || { cat "$STATE/deploy.log"; die "docker stack deploy"; }
for svc in shard-0 shard-1 worker-0 worker-1; do wait_for 120 "a task of $svc" one_task "$svc"; done
w0=$(tasks worker-0); w1=$(tasks worker-1)  # run once: one task each
running_task() { old=$(docker ps -q --no-trunc --filter "label=com.docker.swarm.service.name=${STACK}_shard-1" | head -1); [[ -n $old ]]; }
wait_for 120 "a running shard-1 task" running_task
shard_up() { [[ $(health "$1") == healthy ]]; }
wait_for 180 "shard-1 healthy" shard_up "$old"
say "  tasks started, shard-1 healthy at $(address "$old") ($((SECONDS - t)) s)"
say "$(docker logs "$old" 2>&1 | awk '/serving on/ && !n++' | sed 's/^.* INFO [^:]*: /  shard-1: /')"

restart_at=$((STEPS / 4))
at_step() {
    step=$( { docker logs "$w0"; docker logs "$w1"; } 2>&1 | sed -n 's/^worker [01]: step \([0-9]*\)\/.*/\1/p' | sort -n | tail -1)
    [[ ${step:-0} -ge $restart_at ]]
}
wait_for 300 "a worker at step $restart_at" at_step
running "$w0" && running "$w1" || die "a worker finished before step $restart_at of $STEPS: not a restart mid-run (raise STEPS)"
old_address=$(address "$old")
say "  a worker is at step $step of $STEPS: stopping shard-1's task ($old_address) with SIGTERM"
killed_at=$(date +%s.%N)
docker kill --signal TERM "$old" >/dev/null
calc() { "$HOSTPY" -c "print(round($1, 2))"; }
new_task() { new=$(docker ps -q --no-trunc --filter "label=com.docker.swarm.service.name=${STACK}_shard-1" | grep -v "$old" | head -1); [[ -n $new ]] && shard_up "$new"; }
wait_for 180 "a new shard-1 task healthy" new_task
new_address=$(address "$new")
down_at=$(date -d "$(docker inspect -f '{{.State.FinishedAt}}' "$old")" +%s.%N)
healthy_at=$(docker events --since "$killed_at" --until "$(($(date +%s) + 1))" --filter "container=$new" \
    --filter event=health_status --format '{{.TimeNano}} {{.Status}}' | awk '$2 " " $3 == "health_status: healthy" {print $1; exit}')
[[ -n $healthy_at ]] || die "no health_status: healthy event for the new shard-1 task"
say "  shard-1's new task: $new_address (was $old_address); old task exited $(docker inspect -f '{{.State.ExitCode}}' "$old") \
$(calc "$down_at - $killed_at") s after SIGTERM, the new one healthy $(calc "$healthy_at / 1e9 - $down_at") s after that"
[[ $new_address != "$old_address" ]] || die "the new task has the old task's address $old_address: not a move"
final=$(docker logs "$old" 2>&1 | grep -E "checkpoint /data/\S*: [0-9]* keys" | tail -1)
restored=$(docker logs "$new" 2>&1 | awk '/restored checkpoint/ && !n++') && [[ -n $restored ]] || die "the new shard-1 task's log has no 'restored checkpoint' line"
say "    at SIGTERM: ${final#* INFO }"
say "    at start:   ${restored#* INFO }"
ckpt_final=$(grep -o '/data/ckpt-[0-9]*' <<<"$final" || true)
[[ -n $ckpt_final && $ckpt_final == "$(grep -o '/data/ckpt-[0-9]*' <<<"$restored")" ]] \
    || die "the new shard-1 task did not restore the checkpoint the old one wrote at SIGTERM"

# Resume: each worker's first step line after the old task died, against the first passing health check.
first_step_after() {  # first_step_after WORKER SECONDS: epoch seconds of its first step line after then
    docker logs -t "$1" 2>&1 | "$HOSTPY" -c '
import re, sys
from datetime import datetime, timezone
after = float(sys.argv[1])
for line in sys.stdin.read().splitlines():  # all of it: docker logs is not cut off (pipefail)
    m = re.match(r"(\S+?)(?:\.(\d+))?Z worker \d+: step ", line)
    if m:
        t = datetime.fromisoformat(m[1]).replace(tzinfo=timezone.utc).timestamp() + float("0." + (m[2] or "0"))
        if t > after:
            sys.exit(print(f"{t:.6f}"))
sys.exit(1)' "$2"
}
for w in 0 1; do
    c=$([[ $w == 0 ]] && echo "$w0" || echo "$w1")
    wait_for 60 "worker-$w stepping again" first_step_after "$c" "$down_at" >/dev/null
    delay=$(calc "$(first_step_after "$c" "$down_at") - $healthy_at / 1e9")
    say "  worker-$w resumed $delay s after the new shard-1 turned healthy (limit $RESUME_LIMIT s)"
    "$HOSTPY" -c "import sys; sys.exit(not $delay < $RESUME_LIMIT)" \
        || die "worker-$w resumed $delay s after the new shard-1 turned healthy: more than $RESUME_LIMIT s (does it re-resolve the name? client/transport.py)"
done

# Both workers finish; every key's Adam steps = the pushes the workers made.
out=$(timeout 300 docker wait "$w0" "$w1") || die "workers still running 300 s after the restart"
mapfile -t codes <<<"$out"
pushes=0
for w in 0 1; do
    c=$([[ $w == 0 ]] && echo "$w0" || echo "$w1")
    line=$(docker logs "$c" 2>&1 | grep -E "^worker $w: (OK|FAILED)" | tail -1 || true)
    say "  worker-$w exit ${codes[$w]}: ${line:-no result line}"
    [[ ${codes[$w]} == 0 && $line == *": OK:"* ]] || die "worker-$w did not reach the accuracy target"
    pushed=$(docker logs "$c" 2>&1 | sed -n "s/^worker $w: pushed every key \([0-9]*\) times, \([0-9]*\) dropped.*/\1 \2/p")
    read -r n dropped <<<"$pushed"
    [[ -n $n && $dropped == 0 ]] || die "worker-$w: no 'pushed every key N times, 0 dropped' line"
    pushes=$((pushes + n))
done
stats=$(docker exec "$new" optserve --log-level WARNING status --json --token-file /run/secrets/optserve_token \
    shard-0:50051 shard-1:50051) || die "optserve status"
verdict=$("$HOSTPY" -c '
import json, sys
want, shards = int(sys.argv[1]), json.load(sys.stdin)
keys = {k["key"]: k["version"] for s in shards for k in s["keys"]}
wrong = {k: v for k, v in keys.items() if v != want}
since = shards[1]["pushes"]  # calls shard-1 took since its restart
print(f"WRONG: {wrong or keys}" if wrong or not keys or not since else f"{len(keys)} keys on {len(shards)} "
      f"shards, each at {sorted(set(keys.values()))} Adam steps; shard-1 took {since} pushes since its restart")
' "$pushes" <<<"$stats")
say "  $verdict; the workers pushed every key $pushes times"
[[ $verdict != WRONG* ]] || die "a key's steps differ from the pushes applied (or no push reached the new shard-1): $verdict"
refused=$(docker exec "$new" optserve --log-level WARNING status localhost:50051 2>&1 || true)
[[ $refused == *UNAUTHENTICATED* ]] || die "a call without the token was not refused: $refused"
say "  a call without the token: refused (UNAUTHENTICATED)"
say "stack passed in $((SECONDS - t)) s"
