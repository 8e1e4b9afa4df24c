#!/usr/bin/env bash
# Starts echo-jax training on every host of a TPU pod, or on N simulated hosts of this machine (DESIGN §10).
#
#   launch.sh --tpu NAME --zone ZONE [--project P] [--remote_dir DIR] [--logdir DIR] -- <train_pretrain.py args>
#   launch.sh --tpu NAME --zone ZONE [--project P] [--remote_dir DIR] [--logdir DIR] --setup
#   launch.sh --local N [--logdir DIR] -- <train_pretrain.py args>
#
# --setup (once per pod, and again when the requirements change): stops running trainers, copies the code, then
#   makes ~/echo_jax_venv on every worker from Python 3.11 (ECHO_WORKER_PYTHON, default python3.11) with
#   requirements.txt, pinned by constraints.txt, and JAX's TPU runtime. The trainers and the dashboard then run from it
#   (without it, from the worker's python3); one not finished, or made for other requirements, stops the launch.
# --tpu: stops stale trainers and removes the old code on every worker, copies this checkout's code to
#   ~/DIR (default echo_jax_code) on every worker, then starts all workers at once with identical arguments.
#   Each worker is started by its own `gcloud ... ssh --worker=I` (one exit status and one log per worker, which
#   `--worker=all` cannot give). The trainer runs detached on the worker, logging to ~/echo_jax_logs/worker_I.log
#   there, so a dropped ssh connection does not stop it; its output is also streamed to LOGDIR/worker_I.log here.
#   That session first checks that the worker runs this launch's copy of the code and no stale trainer (the calls on
#   all workers need not report a worker they failed on).
# --local N: N processes on this machine, joined through a coordinator on 127.0.0.1 (logs LOGDIR/process_I.log),
#   each in a session of its own: Ctrl-C and a closing terminal's SIGHUP reach launch.sh alone, which stops them; a
#   guard stops them when launch.sh is killed (SIGKILL runs no trap).
#   Give each process its devices with XLA_FLAGS=--xla_force_host_platform_device_count=K.
# A launch moves each earlier log aside (LOG.1, the last launch's, to LOG.5), here and on the workers.
# Either way: prints which host runs process 0 (it writes the run log) and how to open the dashboard, and fails
# fast: when any host fails, the others are stopped and the failing host's log tail is printed.
# Stopping a trainer (a stale one, all on Ctrl-C) sends SIGTERM, which makes it save a checkpoint at its next
# synchronised step and exit; one still running ECHO_STOP_GRACE_S seconds later (default 180) is killed, so that no
# old trainer holds the TPU or writes the workdir beside the new one. After a host has failed no save is possible
# (it needs every host) and the others are blocked in a collective with it, where no signal handler runs: they get
# ECHO_FAILED_STOP_GRACE_S (default 10) seconds before the kill. Every gcloud call but the trainers' own ssh
# sessions has a time limit (ECHO_GCLOUD_TIMEOUT_S beyond its own work, default 300 s); one that fails stops the
# launch (exit 2) with what failed and what to check. A session that drops (ssh exit 255; for a re-attach, any failure
# without the worker's word on its trainer) is re-attached to the worker's log from the first byte not received: its
# trainer runs on detached. (gcloud runs a command again when ssh exits 255: the worker refuses a session's second
# run, see claim_session, and launch.sh re-attaches.) The waits before re-attaching double (ECHO_REATTACH_WAIT_S, default 10 s, at first); after
# MAX_REATTACH drops in a row (a session that held ECHO_REATTACH_STEADY_S, default 300 s, ends a row) launch.sh stops
# following the run, leaves every trainer running, says how to follow and stop them, and exits 69. A re-attach follows
# and reports this launch's trainer only (see worker_attach): when the session that was to start it dropped first, the
# worker fails the launch, saying so (launch again), instead of passing an earlier launch's exit status for its own.
# The workdir must be storage every host shares (gs:// on a pod). launch.sh reads train_pretrain.py's flagfiles
# (--flagfile=FILE, a name relative to the current directory) as absl does, for the --workdir: on a pod the workers get
# each file's flags in its place (they have no copy of a file outside the code); --local's trainers read the files.
# Exit status: 0 the run finished; 75 every host exited 0 but the run stopped short (a SIGTERM; relaunch to resume);
# 1 a host failed; 2 refused, or a gcloud call failed; 69 a worker out of reach; 130, 143, 129 Ctrl-C, SIGTERM, SIGHUP.

set -euo pipefail

readonly STALE_PATTERN_SUFFIX="/train_pretrain.py"
readonly TAIL_LINES=40
# How many earlier launches' logs are kept beside each log (LOG.1, the last launch's, to LOG.KEPT_LOGS).
readonly KEPT_LOGS=5
# A dropped ssh session to a worker (its trainer runs on, detached) is re-attached after REATTACH_WAIT_S seconds, a
# wait that doubles at each drop in a row (a network fault takes a while to clear), up to MAX_REATTACH times; a
# session that held REATTACH_STEADY_S seconds ends the row. Past that, the launch stops following the run, exiting
# EXIT_OUT_OF_REACH, and stops no trainer.
readonly MAX_REATTACH=5
readonly REATTACH_WAIT_S=${ECHO_REATTACH_WAIT_S:-10}
readonly REATTACH_STEADY_S=${ECHO_REATTACH_STEADY_S:-300}
readonly EXIT_OUT_OF_REACH=69
# launch.sh's exit status when every host exited 0 but the run stopped before train.steps (a SIGTERM: maintenance,
# preemption, a stop by hand), by the line a stopped trainer prints (STOPPED_SHORT): a relaunch resumes it.
readonly EXIT_STOPPED=75
readonly STOPPED_SHORT="^stopped at step [0-9]+ of [0-9]+; relaunch to resume\$"
# After a host fails, how long others may take to fail too (those that lost it in a collective) and be shown with it.
readonly FAILURE_GRACE_S=2
readonly STOP_GRACE_S=${ECHO_STOP_GRACE_S:-180}
readonly FAILED_STOP_GRACE_S=${ECHO_FAILED_STOP_GRACE_S:-10}
# Seconds a gcloud control call (describe, scp, a command on all workers) may take beyond its own work.
readonly GCLOUD_TIMEOUT_S=${ECHO_GCLOUD_TIMEOUT_S:-300}
# Where --setup puts each worker's Python environment (under ~), the file it writes there last (the digest of the
# requirements it installed), and the seconds its installs may take.
readonly WORKER_VENV=echo_jax_venv
readonly VENV_READY=.echo_jax_requirements
readonly SETUP_TIMEOUT_S=${ECHO_SETUP_TIMEOUT_S:-1800}
# The last line of a worker's session that ends with its trainer's exit status (exit_as_trainer).
readonly TRAINER_EXITED="launch.sh: the trainer exited with status"
# What a worker's session says instead when the trainer ended and left no exit status.
readonly TRAINER_GONE="launch.sh: the trainer ended without an exit status"
# What a re-attach says when the worker runs no trainer of its launch: the session that was to start it ended first.
readonly TRAINER_NOT_STARTED="launch.sh: this launch's trainer was not started on this worker"
# A worker's exit status for a session whose command gcloud ran again there (claim_session): launch.sh re-attaches.
readonly EXIT_RERUN=79
readonly IMPORTS_CHECK="import echo_jax.train.entry, echo_jax.dashboard, echo_jax.synthesis, echo_jax.codecs.mel, \
gcsfs, huggingface_hub.cli.hf"
# This checkout (on a worker: its copy of the code).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly HERE

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "launch.sh: $*" >&2
  exit 2
}

# The command-line pattern (pkill/pgrep -f) of the trainer run from code directory DIR (a name under ~, or a path
# without its leading slash): it starts at the slash before DIR, so that another directory ending with DIR is not
# matched, and its bracket keeps it from matching the shell that runs pkill. DIR's regex characters are escaped.
trainer_pattern() {
  # shellcheck disable=SC2001  # in ${1//…/…} the matched text (&) needs bash 5.2's patsub_replacement
  printf '[/]%s%s' "$(sed 's/[][\\^$*+?(){}|.]/\\&/g' <<< "$1")" "$STALE_PATTERN_SUFFIX"
}

# stop_trainers PATTERN GRACE: SIGTERM to the trainers whose command line matches PATTERN, up to GRACE seconds to
# save and exit, then SIGKILL. Runs on the workers: sent there by stop_remote_trainers, and called by worker_run.
stop_trainers() {
  local i
  pkill -TERM -f "$1" || return 0
  for ((i = 0; i < $2; i++)); do
    pgrep -f "$1" > /dev/null || return 0
    sleep 1
  done
  pkill -KILL -f "$1" || true
}

# tree_digest DIR: the digest of the files under DIR (names and contents; Python's bytecode caches left out).
tree_digest() {
  (cd "$1" && find -L . -type f ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum |
    cut -d' ' -f1)
}

# On a TPU worker: exits unless this code is the code launch.sh copied (DIGEST, its tree_digest). gcloud's
# `--worker=all` calls (the stop, the removal of the old code, the copy) need not report a worker they failed on:
# older gcloud releases exit 0 whatever happened there. A worker whose old code was not removed gets the new copy
# inside it, and would run the old one; a copy cut short would run half the new code. This worker's own session, whose
# exit status gcloud does report, checks it.
check_copy() {
  [[ $(tree_digest "$HERE") == "$1" ]] && return 0
  echo "launch.sh: $(hostname): $HERE is not the code copied for this launch (removing the old copy, or copying" \
    "the new one, failed on this worker); launch again, and if that fails the same way, remove it there" \
    "(gcloud compute tpus tpu-vm ssh NAME --worker=I --command='rm -rf $HERE')" >&2
  exit 1
}

# python_of VENV: the Python that runs the trainer: $PYTHON if set, else VENV's when it exists, else python3.
python_of() {
  if [[ -n ${PYTHON:-} ]]; then
    echo "$PYTHON"
  elif [[ -x $1/bin/python ]]; then
    echo "$1/bin/python"
  else
    echo python3
  fi
}

# The digest of this checkout's requirements (what a worker's environment must have been made for).
requirements_digest() {
  cat "$HERE/requirements.txt" "$HERE/constraints.txt" | sha256sum | cut -d' ' -f1
}

# On a TPU worker: the Python that runs the trainer and the dashboard (see python_of). An environment that --setup did
# not finish, or made for other requirements, is refused: the trainer would run with missing or other packages.
worker_python() {
  local venv=$HOME/$WORKER_VENV
  if [[ -z ${PYTHON:-} && -e $venv && $(cat "$venv/$VENV_READY" 2>/dev/null) != "$(requirements_digest)" ]]; then
    echo "launch.sh: $(hostname): $venv was not finished by launch.sh --setup, or was made for other requirements;" \
      "run launch.sh --tpu NAME --zone ZONE --setup again" >&2
    return 1
  fi
  python_of "$venv"
}

# new_log LOG: moves the earlier launches' LOG to LOG.1 (the last one), LOG.2 …, up to KEPT_LOGS of them, then
# makes LOG empty: a relaunch after a failure must not erase the failure's log.
new_log() {
  local i
  for ((i = KEPT_LOGS; i > 1; i--)); do
    if [[ -e $1.$((i - 1)) ]]; then mv -f "$1.$((i - 1))" "$1.$i"; fi
  done
  if [[ -e $1 ]]; then mv -f "$1" "$1.1"; fi
  : > "$1"
}

# On a TPU worker: sets, for worker $1, log (its trainer's), status (the trainer's exit status and launch, written
# when it ends: launch_status), mark (the launch whose trainer the log and status are, written just before it starts)
# and start_lock (held while a session starts a trainer: see worker_run). The caller declares them local.
worker_files() {
  log="$HOME/echo_jax_logs/worker_$1.log"
  status="$HOME/echo_jax_logs/worker_$1.status"
  mark="$HOME/echo_jax_logs/worker_$1.launch"
  start_lock="$HOME/echo_jax_logs/worker_$1.starting"
}

# The launch that this session on a worker belongs to: ECHO_SESSION's first part (see claim_session); empty in a
# session that launch.sh did not name.
session_launch() {
  local session=${ECHO_SESSION:-}
  echo "${session%%/*}"
}

# launch_status STATUS_FILE LAUNCH: the exit status in STATUS_FILE, when the trainer of LAUNCH wrote it (any launch's
# when LAUNCH is empty); fails when there is none: no file yet, or another launch's (a previous launch's status must
# not pass for this one's).
launch_status() {
  local code owner
  { read -r code owner < "$1"; } 2> /dev/null || return 1
  [[ -z $2 || $owner == "$2" ]] || return 1
  echo "$code"
}

# Runs on a TPU worker (launch.sh calls itself there, with the copied code's tree_digest as $2): the trainer detached,
# its log followed until it exits.
worker_run() {
  local worker=$1 copy_id=$2 launch
  shift 2
  launch=$(session_launch)
  local log status mark start_lock lock
  worker_files "$worker"
  mkdir -p "$(dirname "$log")"
  # Held until this launch's trainer has started or this session has ended: a re-attach that comes meanwhile (this
  # session dropped while stopping a stale trainer) waits for it, then finds by MARK whether the trainer started.
  exec {lock}>> "$start_lock"
  flock "$lock"
  # A trainer of an earlier launch that the stop on all workers did not reach (see check_copy) would hold the TPU or
  # write the workdir beside the new one, also when this launch then fails the check of its code. Stopped before this
  # launch's status file is cleared: the shell that waited for it writes its exit status there just after it ends.
  # The other workers' trainers wait meanwhile to join (JAX's initialisation allows 300 s).
  local pattern
  pattern=$(trainer_pattern "${HERE#/}")
  if pgrep -f "$pattern" > /dev/null; then
    echo "launch.sh: $(hostname): a trainer of an earlier launch still runs here (pid $(pgrep -d ' ' -f "$pattern"));" \
      "the stop on all workers did not reach it; stopping it (killed after ${STOP_GRACE_S} s)" >&2
    stop_trainers "$pattern" "$STOP_GRACE_S"
    sleep 1
  fi
  check_copy "$copy_id"
  local problem
  problem=$(pod_workdir_problem "$(workdir_of "$@")" "$HERE")
  [[ -z $problem ]] || { echo "launch.sh: $(hostname): $problem" >&2; exit 2; }
  rm -f "$status"
  # Created here, not by the detached shell's redirection: tail gives up at once on a file that does not exist yet,
  # and the worker would then report a failure while its trainer runs on.
  new_log "$log"
  local python
  python=$(worker_python) || exit 1
  echo "launch.sh: worker python: $python" >> "$log"  # for the dashboard command (report_process0)
  echo "$launch" > "$mark"
  exec {lock}>&-  # the trainer would hold it too
  cd "$HERE"
  # The full script path is in the trainer's command line, so that the stale-trainer pattern finds it; it reaches
  # the shell that waits for the trainer through the environment, so that the pattern never matches that shell
  # (killed, it would write no exit status and a trainer that stopped cleanly would count as failed).
  # shellcheck disable=SC2016  # the single-quoted script expands in the inner shell
  ECHO_TRAINER="$HERE/train_pretrain.py" ECHO_PYTHON="$python" nohup setsid \
    bash -c '"$ECHO_PYTHON" -u "$ECHO_TRAINER" "$@"; echo "$? '"$launch"'" > "'"$status"'"' _ "$@" >> "$log" 2>&1 \
    < /dev/null &
  local pid=$!
  tail -n +1 -f --pid="$pid" "$log" || true
  wait "$pid" || true  # the status below is the trainer's, written when the detached shell ends
  exit_as_trainer "$status" "$launch" "$worker"
}

# exit_as_trainer STATUS_FILE LAUNCH WORKER: exits with the status that LAUNCH's trainer wrote to STATUS_FILE
# (launch_status), saying so first: ssh's own exit status for a dropped session is 255, so launch.sh looks for this
# line to tell a trainer that exited 255 from a session to re-attach, and takes the trainer's status from it
# (trainer_status). A 255 leaves as 1: gcloud takes a command's 255 for ssh's and runs the command again
# (claim_session). Without such a status, says TRAINER_GONE and exits 1.
exit_as_trainer() {
  local code
  code=$(launch_status "$1" "$2") || { echo "$TRAINER_GONE (worker $3)" >&2; exit 1; }
  echo "$TRAINER_EXITED $code"
  exit $((code == 255 ? 1 : code))
}

# Runs on a TPU worker first in each session that launch.sh starts there (named by ECHO_SESSION, LAUNCH/SESSION):
# exits EXIT_RERUN, saying why, when this session's command already ran here. gcloud's tpu-vm ssh runs the command
# again, within the same call, when ssh exits 255 (up to 10 times, 5 s apart: AttemptRunWithRetries in its
# command_lib/compute/tpus/tpu_vm/ssh.py), the new run's output after the first's on the same stream. So a dropped
# session's --worker-run ran again: it stopped its own trainer as a stale one (the run stopped there), moved the log
# aside and started a trainer alone; and a dropped --worker-attach sent again from the same byte, while launch.sh
# counted both runs' bytes as the log's position (RECEIVED), re-attaching past bytes it never got. launch.sh
# re-attaches instead, from the first byte it did not receive.
claim_session() {
  [[ -n ${ECHO_SESSION:-} ]] || return 0
  local sessions=$HOME/echo_jax_logs/sessions
  # Only the latest launch's sessions can be run again: the marks of earlier launches go.
  [[ -d $sessions/${ECHO_SESSION%%/*} ]] || rm -rf "$sessions"
  mkdir -p "$sessions/${ECHO_SESSION%%/*}"
  mkdir "$sessions/$ECHO_SESSION" 2> /dev/null && return 0
  echo "launch.sh: $(hostname): gcloud ran this session's command again after its connection dropped; not" \
    "running it twice (launch.sh re-attaches instead)" >&2
  exit "$EXIT_RERUN"
}

# Runs on a TPU worker (launch.sh --setup calls itself there, with the copied code's tree_digest as $2): makes
# ~/WORKER_VENV from Python $1 with the pinned requirements and the TPU build of the pinned JAX.
worker_setup() {
  local python=$1 venv=$HOME/$WORKER_VENV jax_version
  check_copy "$2"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2> /dev/null; then
    echo "launch.sh: $(hostname) has no Python 3.11 as $python. Install it on the workers (Ubuntu 22.04: sudo" \
      "add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y python3.11-venv), or name another" \
      "by ECHO_WORKER_PYTHON where launch.sh runs" >&2
    exit 1
  fi
  jax_version=$(sed -n 's/^jax==\([^ #]*\).*/\1/p' "$HERE/requirements.txt")
  [[ -n $jax_version ]] || { echo "launch.sh: $HERE/requirements.txt pins no jax version (jax==X)" >&2; exit 1; }
  # --clear: a venv left by a set-up that failed holds whatever it got to; the digest is written last.
  "$python" -m venv --clear "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$HERE/requirements.txt" -c "$HERE/constraints.txt" \
    "jax[tpu]==$jax_version"
  # What the trainer, the samples, the dashboard and `hf auth login` import, checked here rather than at a launch
  # (JAX on the CPU: a TPU pod's chips start only with every host).
  (cd "$HERE" && JAX_PLATFORMS=cpu "$venv/bin/python" -c "$IMPORTS_CHECK")
  requirements_digest > "$venv/$VENV_READY"
  echo "launch.sh: $(hostname): $venv is ready"
  exit 0
}

# Runs on a TPU worker when launch.sh lost its ssh session to `worker_run` there: follows the log from byte OFFSET
# on (the first one launch.sh did not receive: what was written while it was away is neither lost nor sent twice)
# until the detached trainer exits, then exits with its status. Only this launch's trainer counts: the session may have
# dropped before `worker_run` started it (while it stopped a stale trainer, which this waits for), or before that
# session ran at all, and the log and status there were then an earlier launch's. Ends saying TRAINER_NOT_STARTED
# when this launch's trainer was not started here, and TRAINER_GONE when it ended without an exit status.
worker_attach() {
  local worker=$1 offset=$2 launch
  launch=$(session_launch)
  local log status mark start_lock started=""
  worker_files "$worker"
  if [[ -n $launch ]]; then
    local lock
    exec {lock}>> "$start_lock"
    if ! flock -n "$lock"; then
      echo "launch.sh: $(hostname): waiting for the session that starts this launch's trainer on worker $worker" \
        "(it may be stopping a stale trainer there, for up to ${STOP_GRACE_S} s)" >&2
      flock "$lock"
    fi
    exec {lock}>&-
    started=$(cat "$mark" 2> /dev/null || true)
    if [[ $started != "$launch" ]]; then
      echo "$TRAINER_NOT_STARTED (worker $worker): the session that was to start it ended before it did (dropped," \
        "or failed)${started:+; the trainer last started there belongs to launch $started}; launch again" >&2
      exit 1
    fi
  fi
  tail -c +$((offset + 1)) -f "$log" &
  local tailer=$!
  # Until the status comes, or no trainer runs here, or another launch's does (its session reset the log and status).
  while ! launch_status "$status" "$launch" > /dev/null && pgrep -f "$(trainer_pattern "${HERE#/}")" > /dev/null &&
      [[ -z $launch || $(cat "$mark" 2> /dev/null) == "$launch" ]]; do
    sleep 1
  done
  sleep 1  # the status is written just after the trainer exits
  kill "$tailer" 2>/dev/null || true
  exit_as_trainer "$status" "$launch" "$worker"
}

# shell_quote TEXT: TEXT as one word for a shell, in single quotes (its own single quotes written '\'').
shell_quote() {
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

# The logs of started hosts are watched until all succeed or one fails. A pod's worker sessions also have the time
# they started (SECONDS) and the bytes of the worker's log received so far (see worker_session).
declare -a PIDS=() LOGS=() NAMES=() SESSION_START=() RECEIVED=()
PROCESS0_REPORTED=0

report_process0() {
  local i
  for i in "${!LOGS[@]}"; do
    if grep -q '^process_index=0 ' "${LOGS[$i]}" 2>/dev/null; then
      echo "launch.sh: process 0 (run log, events, dashboard) runs on ${NAMES[$i]}"
      if [[ -n ${TPU:-} ]]; then
        local worker=${NAMES[$i]#worker } python monitor
        python=$(sed -n 's/^launch.sh: worker python: //p' "${LOGS[$i]}" | head -n 1)
        monitor="cd ~/$REMOTE_DIR && $(printf '%q' "${python:-python3}") monitor.py"
        monitor+=" $(printf '%q' "${WORKDIR:-WORKDIR}")"
        # monitor.py listens on the worker's loopback only: ssh forwards it here, where it stays private.
        echo "launch.sh: dashboard: run here, then open http://localhost:8080"
        echo "  $(tpu_command ssh) --worker=$worker --command=$(shell_quote "$monitor") -- -L 8080:localhost:8080"
        echo "launch.sh: or, at a public URL that anyone who has it can open (cloudflared must be installed on that" \
          "worker; --setup does not install it):"
        echo "  $(tpu_command ssh) --worker=$worker" \
          "--command=$(shell_quote "$monitor & cloudflared tunnel --url http://localhost:8080 --http-host-header localhost:8080")"
      else
        echo "launch.sh: dashboard: python monitor.py $(printf '%q' "${WORKDIR:-WORKDIR}"), then open http://127.0.0.1:8080" \
          "(or, at a public URL that anyone who has it can open: cloudflared tunnel --url http://localhost:8080 --http-host-header localhost:8080)"
      fi
      PROCESS0_REPORTED=1
      return
    fi
  done
}

# stop_pids GRACE PID...: sends SIGTERM to the pids (children of this shell), waits up to GRACE seconds for them to
# exit, then kills the rest.
stop_pids() {
  local grace=$1
  shift
  (($# > 0)) || return 0
  local -a left
  mapfile -t left < <(term_and_wait "$grace" "$@")
  ((${#left[@]} == 0)) && return 0
  echo "launch.sh: still running ${grace} s after SIGTERM; killing them" >&2
  kill -KILL "${left[@]}" 2>/dev/null || true
  wait "$@" 2>/dev/null || true  # gone, not merely signalled, when launch.sh exits
}

# tree_of PID: PID and the processes under it, parents first; not those in another session than launch.sh's: a
# process that detached itself (setsid, as a worker's trainer does) is meant to outlive its parent.
tree_of() {
  local child
  echo "$1"
  for child in $(pgrep -P "$1" -s 0 || true); do
    tree_of "$child"
  done
}

# stop_following: ends the ssh sessions that follow the workers, with gcloud and ssh under them (killing the session's
# shell alone left them running), the shell first: it would report its pipeline's end. Uses watch_hosts' locals.
stop_following() {
  local i
  local -a tree=()
  for i in "${!PIDS[@]}"; do
    [[ -n ${finished[$i]:-} || -n ${reattach_at[$i]:-} ]] || mapfile -t -O "${#tree[@]}" tree < <(tree_of "${PIDS[$i]}")
  done
  ((${#tree[@]} == 0)) || kill "${tree[@]}" 2>/dev/null || true
}

# stop_all GRACE: stops every host's trainer (see stop_pids).
stop_all() {
  if [[ -n ${TPU:-} ]]; then
    # The local ssh sessions only follow the logs; the detached trainers are stopped on the workers.
    stop_following
    stop_remote_trainers "$1" ||
      echo "launch.sh: the trainers may still run; stop them by hand: $(remote_stop_command)" >&2
  else
    stop_pids "$1" "${PIDS[@]}"
  fi
}

# Reaps the hosts that have ended since the last call: `running` counts down, each failure is appended to `failed`
# as INDEX:STATUS. A worker's session cut off (session_cut_off) is re-attached instead, once its wait is over (the
# trainer runs on, detached). Uses watch_hosts' locals.
reap_hosts() {
  local i status received
  for i in "${!PIDS[@]}"; do
    [[ -n ${finished[$i]:-} ]] && continue
    if [[ -n ${reattach_at[$i]:-} ]]; then
      ((SECONDS >= reattach_at[$i])) || continue
      unset "reattach_at[$i]"
      worker_session "$i" "--worker-attach $i ${RECEIVED[$i]}"
      continue
    fi
    kill -0 "${PIDS[$i]}" 2>/dev/null && continue
    status=0
    wait "${PIDS[$i]}" || status=$?
    if [[ -n ${TPU:-} ]]; then
      received=$(cat "$SESSIONS_DIR/received_$i" 2>/dev/null || true)
      RECEIVED[i]=$((RECEIVED[i] + ${received:-0}))
      if session_cut_off "$i" "$status"; then
        schedule_reattach "$i" "$status"
        continue
      fi
      status=$(trainer_status "$i" "$status")
    fi
    finished[$i]=1
    running=$((running - 1))
    ((status == 0)) || failed+=("$i:$status")
  done
}

# session_cut_off WORKER STATUS: whether the session to WORKER ended with STATUS but without the worker's word on its
# trainer (TRAINER_EXITED or TRAINER_GONE): ssh exits 255 when the connection drops (or keepalives go unanswered),
# gcloud then runs the command again, which the worker answers with EXIT_RERUN (claim_session), and a re-attach also
# fails with gcloud's own 1 while the TPU's API is out of reach. A first session's other failures are the worker's (a
# refused copy or workdir).
session_cut_off() {
  (($2 != 0)) || return 1
  (($2 == 255 || $2 == EXIT_RERUN)) || [[ -n ${reattach_count[$1]:-} ]] || return 1
  ! tail -n 3 "${LOGS[$1]}" 2>/dev/null | grep -q -e "^$TRAINER_EXITED [0-9]*\$" -e "^$TRAINER_GONE" \
    -e "^$TRAINER_NOT_STARTED"
}

# trainer_status WORKER STATUS: the exit status of WORKER's trainer, which its session's last line gives
# (exit_as_trainer), else the session's STATUS.
trainer_status() {
  local said
  said=$(tail -n 3 "${LOGS[$1]}" 2>/dev/null | sed -n "s/^$TRAINER_EXITED \([0-9]*\)\$/\1/p" | tail -n 1)
  echo "${said:-$2}"
}

# schedule_reattach WORKER STATUS: sets when WORKER's session is started again (see MAX_REATTACH), or gives the
# worker up (out_of_reach). Uses watch_hosts' locals.
schedule_reattach() {
  local worker=$1 wait
  if ((SECONDS - SESSION_START[worker] >= REATTACH_STEADY_S)); then
    reattach_count[$worker]=0
  fi
  ((${reattach_count[$worker]:-0} < MAX_REATTACH)) || out_of_reach "$worker"
  reattach_count[$worker]=$((${reattach_count[$worker]:-0} + 1))
  wait=$((REATTACH_WAIT_S << (reattach_count[$worker] - 1)))
  echo "launch.sh: lost the ssh session to ${NAMES[$worker]} (exit $2); its trainer runs on; re-attaching in" \
    "$wait s (${reattach_count[$worker]} of $MAX_REATTACH)" >&2
  reattach_at[$worker]=$((SECONDS + wait))
}

# out_of_reach WORKER: the session to WORKER was cut off once more than MAX_REATTACH allows. Its trainer runs detached
# and, as far as anyone knows, trains on with the others: stopping them now would be a failed host's stop (no save is
# possible without it, so they are killed) and throw away every step since the last checkpoint, for what may be a
# fault of the network between here and the worker. Says how to follow and stop them, then stops following the run.
out_of_reach() {
  local worker=${NAMES[$1]#worker }
  echo "launch.sh: lost the ssh session to worker $worker $((MAX_REATTACH + 1)) times in a row; its trainer may still" \
    "run there, detached, and the other workers' with it; launch.sh stops following the run and stops no trainer" \
    "(exit $EXIT_OUT_OF_REACH)." >&2
  echo "launch.sh: worker $worker's log: $(tpu_command ssh) --worker=$worker" \
    "--command='tail -n $TAIL_LINES -f ~/echo_jax_logs/worker_$worker.log'" >&2
  echo "launch.sh: the run's progress: the dashboard (monitor.py), or events.jsonl and metrics.jsonl in the workdir" >&2
  echo "launch.sh: to stop every trainer (each saves a checkpoint first): $(remote_stop_command); relaunching the" \
    "same command stops them so too, then resumes the run" >&2
  stop_following
  exit "$EXIT_OUT_OF_REACH"
}

# The INDEX:STATUS arguments, ordered by when host INDEX's log was last written.
by_last_log_write() {
  local entry
  for entry in "$@"; do
    echo "$(date -r "${LOGS[${entry%%:*}]}" +%s.%N 2>/dev/null || echo 0) $entry"
  done | sort -n | cut -d' ' -f2
}

# show_log_tail WHAT LOG: says WHAT, then shows the last lines of LOG (on stderr).
show_log_tail() {
  echo "launch.sh: $1. Last lines of $2:" >&2
  tail -n "$TAIL_LINES" "$2" >&2 || true
}

# stop_hosts_on_signals: Ctrl-C, SIGTERM and (for --local) SIGHUP stop every host started so far (PIDS), then exit.
# Set before the first host starts: the local trainers run in sessions of their own, so a signal that came before
# the traps (while the others started) ended launch.sh and left them running, with no one to stop them.
stop_hosts_on_signals() {
  trap 'echo "launch.sh: interrupted; stopping every host" >&2; stop_all "$STOP_GRACE_S"; exit 130' INT
  trap 'echo "launch.sh: terminated; stopping every host" >&2; stop_all "$STOP_GRACE_S"; exit 143' TERM
  if [[ -z ${TPU:-} ]]; then
    # The local trainers, in sessions of their own, do not get a closing terminal's SIGHUP. (A pod's trainers run
    # on, detached, when the launching machine goes away.)
    trap 'echo "launch.sh: hung up; stopping every host" >&2; stop_all "$STOP_GRACE_S"; exit 129' HUP
  fi
}

watch_hosts() {
  local running=${#PIDS[@]} failure
  local -a failed=()
  # Per host: whether it ended, its sessions cut off in a row (set once one was), when its re-attach is due.
  declare -A finished=() reattach_count=() reattach_at=()
  while ((running > 0)); do
    reap_hosts
    if ((${#failed[@]} > 0)); then
      # The hosts that lost the failed one in a collective fail moments later, maybe within the same poll: the
      # tails are shown in the order the logs were last written, the first (usually holding the cause) first.
      sleep "$FAILURE_GRACE_S"
      reap_hosts
      for failure in $(by_last_log_write "${failed[@]}"); do
        show_log_tail "${NAMES[${failure%%:*}]} failed (exit ${failure#*:})" "${LOGS[${failure%%:*}]}"
      done
      echo "launch.sh: stopping the other hosts (killed after ${FAILED_STOP_GRACE_S} s: no save is possible" \
        "without the failed one)" >&2
      stop_all "$FAILED_STOP_GRACE_S"
      exit 1
    fi
    ((PROCESS0_REPORTED)) || report_process0
    sleep 0.5
  done
  ((PROCESS0_REPORTED)) || report_process0
  local stopped
  stopped=$(grep -h -m 1 -E "$STOPPED_SHORT" "${LOGS[@]}" | head -n 1 || true)
  if [[ -n $stopped ]]; then
    echo "launch.sh: $stopped (every host saved a checkpoint there and exited 0); logs in $LOGDIR" >&2
    exit "$EXIT_STOPPED"
  fi
  echo "launch.sh: all ${#PIDS[@]} hosts finished; logs in $LOGDIR"
}

# trim TEXT: TEXT without the blanks around it (what Python's str.strip() takes off a flagfile's line).
trim() {
  local text=${1#"${1%%[![:space:]]*}"}
  printf '%s' "${text%"${text##*[![:space:]]}"}"
}

# home_expanded PATH: PATH with a leading ~ or ~USER expanded, as absl does (os.path.expanduser) to a flagfile's name.
home_expanded() {
  local user home
  case $1 in
    \~ | \~/*) printf '%s' "$HOME${1#\~}" ;;
    \~*)
      user=${1%%/*}
      user=${user#"~"}
      home=$(getent passwd "$user" | cut -d: -f6) || true
      if [[ -n $home ]]; then printf '%s' "$home${1#"~$user"}"; else printf '%s' "$1"; fi ;;
    *) printf '%s' "$1" ;;
  esac
}

# expand_flagfiles ARGS...: sets TRAIN_ARGS to train_pretrain.py's arguments ARGS as absl reads them (FLAGS(argv),
# read_flags_from_files): each --flagfile=FILE (one dash or two; also `--flagfile FILE`) replaced by FILE's flags,
# where it stood, so that the flags after it win over the file's and the file's over those before it; none after
# `--`. A flagfile holds one argument per line, blanks around it stripped; blank lines and lines starting with # or //
# are left out; a line starting with --flagfile= reads that file there (one already being read there is skipped, with
# absl's warning). A file's name has ~ expanded, and a relative one is relative to the current directory, here as in
# absl (nested ones too). Dies when a flagfile cannot be read, or a line would be read otherwise by the trainer that
# gets the expanded arguments (a pod's: see launch_tpu) than by one that reads the file.
expand_flagfiles() {
  TRAIN_ARGS=()
  local -a reading=()
  while (($# > 0)); do
    case $1 in
      --) TRAIN_ARGS+=("$@"); return ;;
      --flagfile | -flagfile)
        (($# > 1)) || die "$1 with no file name"
        read_flagfile "$(home_expanded "$2")"
        shift 2 ;;
      --flagfile=* | -flagfile=*) read_flagfile "$(home_expanded "$(trim "${1#*=}")")"; shift ;;
      *) TRAIN_ARGS+=("$1"); shift ;;
    esac
  done
}

# read_flagfile FILE: appends FILE's flags to TRAIN_ARGS (see expand_flagfiles, whose `reading` it uses: the files
# being read, each inside the one before).
read_flagfile() {
  local file=$1 line flag name
  [[ -n $file ]] || return 0  # absl ignores an empty name
  for name in "${reading[@]}"; do
    if [[ $name == "$file" ]]; then
      echo "Warning: Hit circular flagfile dependency. Ignoring flagfile: $file" >&2
      return 0
    fi
  done
  [[ -f $file && -r $file ]] ||
    die "cannot read the flagfile $file (named by --flagfile; a relative name is relative to $PWD)"
  local -a lines
  mapfile -t lines < "$file"
  reading+=("$file")
  for line in "${lines[@]}"; do
    flag=$(trim "$line")
    if [[ -z $flag || $line == "#"* || $line == "//"* ]]; then
      continue
    elif [[ $line == --flagfile=* || $line == -flagfile=* ]]; then
      read_flagfile "$(home_expanded "$(trim "${line#*=}")")"
    elif [[ $flag == --flagfile || $flag == -flagfile || $flag == --flagfile=* || $flag == -flagfile=* ]]; then
      # absl reads such a line as a flag, or fails on it: passed on in the arguments, it would name a flagfile.
      die "the flagfile $file has '$flag' on a line that absl does not read as a flagfile (blanks before it, or" \
        "no =FILE); write --flagfile=FILE at the start of the line"
    else
      TRAIN_ARGS+=("$flag")
    fi
  done
  unset 'reading[-1]'
}

# The --workdir values among train_pretrain.py's arguments (with their flagfiles read: expand_flagfiles), each ended
# by a NUL, in every form absl reads: with one dash or two, the value after `=` or in the next argument; none after
# `--`, where absl stops.
workdirs_of() {
  while (($# > 0)); do
    case $1 in
      --) return ;;
      --workdir=* | -workdir=*) printf '%s\0' "${1#*=}" ;;
      --workdir | -workdir) printf '%s\0' "${2:-}"; shift ;;
    esac
    shift
  done
}

# The --workdir the trainer uses: absl takes the last one given (empty when none is).
workdir_of() {
  local -a workdirs
  mapfile -d '' -t workdirs < <(workdirs_of "$@")
  ((${#workdirs[@]} == 0)) || printf '%s' "${workdirs[-1]}"
}

# Why train_pretrain.py's arguments must not be launched for their --workdir ("" when they may): given more than
# once, the trainer would use the last one, whatever a reader of the command (or a check of the first) takes.
repeated_workdir_problem() {
  local -a workdirs
  mapfile -d '' -t workdirs < <(workdirs_of "$@")
  ((${#workdirs[@]} <= 1)) && return 0
  local listed
  printf -v listed '%s, ' "${workdirs[@]}"
  echo "--workdir is given ${#workdirs[@]} times (${listed%, }): train_pretrain.py would use the last; give it once"
}

# pod_workdir_problem WORKDIR [CODE_DIR]: why a pod's trainers must not write into WORKDIR ("" when they may). They
# run in ~/REMOTE_DIR, which every launch and --setup delete and copy again: a relative workdir (also one written
# ~/..., which no shell expands after --workdir=) would lie there, and a relaunch would delete the run and train again
# from step 0. On a worker, CODE_DIR (that directory) also catches an absolute path into it.
pod_workdir_problem() {
  local workdir=$1 code_dir=${2:-}
  if [[ -z $workdir ]]; then
    echo "no --workdir among the train_pretrain.py arguments (or an empty one)"
  elif [[ $workdir != *://* && $workdir != /* ]]; then
    echo "--workdir=$workdir is relative: the trainers run in ~/$REMOTE_DIR on the workers, which every launch and" \
      "--setup delete, so a relaunch would delete the run; give gs://BUCKET/PATH (or an absolute path on storage" \
      "every worker mounts)"
  elif [[ -n $code_dir && $workdir == /* && $(realpath -m "$workdir")/ == "$code_dir"/* ]]; then
    echo "--workdir=$workdir lies in the code directory $code_dir, which every launch and --setup delete; give" \
      "gs://BUCKET/PATH or a path outside it"
  fi
}

# worker_session WORKER REMOTE_ARGS [SECONDS]: starts the ssh session that runs `launch.sh REMOTE_ARGS` on the
# worker, in the background, its output appended to LOGS[WORKER] here, killed after SECONDS (default: no limit); its
# pid becomes PIDS[WORKER], and the time it started SESSION_START[WORKER]. Its stdout is the worker's log as the
# worker's tail sends it (the worker's own messages go to stderr; the bytes are counted, whatever characters they
# make, as `tail -c` counts them there): its bytes are counted into SESSIONS_DIR/received_WORKER, so that a re-attach
# goes on from the first byte not received. That holds while the stream is one run of the command, which each
# session's name (ECHO_SESSION, see claim_session) makes sure of. Keepalives: a worker that stops answering ends the
# session (exit 255) instead of leaving the launch waiting on it forever. The worker gets this launch's
# ECHO_STOP_GRACE_S (ssh passes no environment).
worker_session() {
  local worker=$1 remote_args=$2 seconds=${3:-0}
  SESSION_COUNT=$((SESSION_COUNT + 1))
  local session=$LAUNCH_ID/$worker.$SESSION_COUNT
  # shellcheck disable=SC2094  # both append to the log; nothing in the pipeline reads it
  {
    gcloud_tpu "$seconds" ssh "$TPU" --worker="$worker" --ssh-flag=-oServerAliveInterval=15 \
      --ssh-flag=-oServerAliveCountMax=8 \
      --command="ECHO_STOP_GRACE_S=$STOP_GRACE_S ECHO_SESSION=$session bash ~/$REMOTE_DIR/launch.sh $remote_args" 2>> "${LOGS[$worker]}" |
      tee -a "${LOGS[$worker]}" | wc -c > "$SESSIONS_DIR/received_$worker" || exit "${PIPESTATUS[0]}"
  } &
  PIDS[worker]=$!
  SESSION_START[worker]=$SECONDS
}

# gcloud_tpu SECONDS VERB ARGS...: `gcloud compute tpus tpu-vm VERB ARGS...` in this launch's zone and project,
# killed after SECONDS (0: no limit), so that a worker that does not answer fails the launch instead of hanging it
# (bash runs the INT/TERM traps only once the command in the foreground returns).
gcloud_tpu() {
  local seconds=$1
  shift
  local -a limit=()
  ((seconds > 0)) && limit=(timeout --kill-after=10 "$seconds")
  "${limit[@]}" gcloud compute tpus tpu-vm "$@" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"}
}

# tpu_command VERB: how a gcloud command on this launch's TPU starts, for a user to run by hand.
tpu_command() {
  printf 'gcloud compute tpus tpu-vm %s %q --zone %q' "$1" "$TPU" "$ZONE"
  [[ -z $PROJECT ]] || printf ' --project %q' "$PROJECT"
}

# on_all_workers WHAT SECONDS VERB ARGS...: gcloud_tpu SECONDS VERB ARGS..., a call on every worker; when it fails
# or runs out of time, says what failed, on which TPU, and what to do, then returns its status (the caller decides
# whether the launch goes on). Under set -e a bare `timeout` ended the launch with 124 and no word.
on_all_workers() {
  local what=$1 seconds=$2 status=0
  shift 2
  gcloud_tpu "$seconds" "$@" || status=$?
  ((status == 0)) && return 0
  if ((status == 124 || status == 137)); then
    echo "launch.sh: $what on every worker of TPU $TPU in $ZONE did not end within its $seconds s" \
      "(ECHO_GCLOUD_TIMEOUT_S, default 300, beyond the call's own work)" >&2
  else
    echo "launch.sh: $what on every worker of TPU $TPU in $ZONE failed (gcloud exited $status; its error is above)" >&2
  fi
  echo "launch.sh: check that the TPU is READY ($(tpu_command describe)) and that every worker answers ssh" \
    "($(tpu_command ssh) --worker=all --command=true), then launch again" >&2
  return "$status"
}

# stop_remote_trainers GRACE: SIGTERM to every worker's trainer, up to GRACE seconds to save and exit, then SIGKILL.
# Says so when the call fails (see on_all_workers), and returns its status.
stop_remote_trainers() {
  local grace=$1 pattern
  pattern=$(trainer_pattern "$REMOTE_DIR")
  on_all_workers "stopping the trainers (SIGTERM, then SIGKILL)" $((grace + GCLOUD_TIMEOUT_S)) ssh "$TPU" \
    --worker=all --command="$(declare -f stop_trainers); stop_trainers '$pattern' $grace"
}

# The command that stops every worker's trainer by hand (each saves a checkpoint first).
remote_stop_command() {
  echo "$(tpu_command ssh) --worker=all --command=\"pkill -TERM -f '$(trainer_pattern "$REMOTE_DIR")'\""
}

# pod_workers: the number of workers of TPU $TPU.
pod_workers() {
  local endpoints
  endpoints=$(gcloud_tpu "$GCLOUD_TIMEOUT_S" describe "$TPU" --format='value(networkEndpoints[].ipAddress)') ||
    die "could not describe TPU $TPU in $ZONE: gcloud failed or took over ${GCLOUD_TIMEOUT_S} s (ECHO_GCLOUD_TIMEOUT_S)"
  local -a addresses
  IFS=';' read -r -a addresses <<< "$endpoints"
  ((${#addresses[@]} > 0)) || die "TPU $TPU in $ZONE lists no workers"
  echo "launch.sh: $TPU has ${#addresses[@]} workers" >&2
  echo "${#addresses[@]}"
}

# copy_code: stops the workers' trainers, then replaces their copy of the code with this checkout's, whose tree_digest
# becomes COPY_ID (see check_copy).
copy_code() {
  stop_remote_trainers "$STOP_GRACE_S" || exit 2
  on_all_workers "removing the old code (rm -rf ~/$REMOTE_DIR)" "$GCLOUD_TIMEOUT_S" ssh "$TPU" --worker=all \
    --command="rm -rf ~/$REMOTE_DIR" || exit 2
  local stage
  stage=$(mktemp -d)
  mkdir "$stage/$REMOTE_DIR"
  local item
  for item in echo_jax configs presets train_pretrain.py inference.py monitor.py disk_watchdog.py launch.sh \
      requirements.txt constraints.txt; do
    [[ -e $HERE/$item ]] && cp -r "$HERE/$item" "$stage/$REMOTE_DIR/"
  done
  find "$stage" -name __pycache__ -type d -prune -exec rm -rf {} +
  COPY_ID=$(tree_digest "$stage/$REMOTE_DIR")
  on_all_workers "copying the code (scp to ~/$REMOTE_DIR)" "$GCLOUD_TIMEOUT_S" scp --recurse "$stage/$REMOTE_DIR" \
    "$TPU:$REMOTE_DIR" --worker=all || { rm -rf "$stage"; exit 2; }
  rm -rf "$stage"
}

# Makes every worker's environment (worker_setup), one ssh session and one log per worker, as for the trainers:
# each worker's own exit status says whether its set-up finished.
setup_tpu() {
  local workers worker python=${ECHO_WORKER_PYTHON:-python3.11}
  local -a failed=()
  workers=$(pod_workers)
  copy_code
  echo "launch.sh: making ~/$WORKER_VENV on $workers workers from $python (minutes: pip downloads JAX and" \
    "libtpu); logs in $LOGDIR/setup_worker_I.log"
  for ((worker = 0; worker < workers; worker++)); do
    LOGS+=("$LOGDIR/setup_worker_$worker.log")
    new_log "${LOGS[-1]}"
    worker_session "$worker" "--worker-setup $(printf '%q' "$python") $COPY_ID" $((SETUP_TIMEOUT_S + GCLOUD_TIMEOUT_S))
  done
  for worker in "${!PIDS[@]}"; do
    wait "${PIDS[$worker]}" || failed+=("$worker")
  done
  for worker in "${failed[@]}"; do
    show_log_tail "the set-up failed on worker $worker" "${LOGS[$worker]}"
  done
  ((${#failed[@]} == 0)) || die "fix that, then run --setup again"
  echo "launch.sh: every worker has ~/$WORKER_VENV; launch with the same --tpu, --zone and -- <train_pretrain.py args>"
}

launch_tpu() {
  local workers
  workers=$(pod_workers)
  copy_code

  local args worker
  args=$(printf ' %q' "$@")
  stop_hosts_on_signals
  for ((worker = 0; worker < workers; worker++)); do
    LOGS+=("$LOGDIR/worker_$worker.log")
    NAMES+=("worker $worker")
    new_log "${LOGS[-1]}"
    RECEIVED[worker]=0
    worker_session "$worker" "--worker-run $worker $COPY_ID --$args"
  done
  echo "launch.sh: started $workers workers; logs here in $LOGDIR, on each worker in ~/echo_jax_logs"
  watch_hosts
}

# process_start PID: when process PID started (clock ticks since boot; what tells it from a later process given the
# same pid), while it runs; nothing once it has ended (a zombie counts as ended).
process_start() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  local -a fields
  read -r -a fields <<< "${stat##*) }"  # the fields after the command's name, which may hold blanks
  [[ ${fields[0]} == [ZX] ]] || echo "${fields[19]}"
}

# term_and_wait GRACE PID...: sends SIGTERM to each PID, waits up to GRACE seconds for them to end, then prints those
# still running, one a line (the caller kills them). A pid counts as running while it has the start it had when this
# was called (process_start): not once it is a zombie, nor when another process was given it.
term_and_wait() {
  local grace=$1 pid waited
  shift
  local -A started=()
  for pid in "$@"; do
    started[$pid]=$(process_start "$pid")
    kill -TERM "$pid" 2>/dev/null || true
  done
  for ((waited = 0; ; waited++)); do
    for pid in "${!started[@]}"; do
      [[ -n ${started[$pid]} && $(process_start "$pid") == "${started[$pid]}" ]] || unset "started[$pid]"
    done
    ((${#started[@]} > 0 && waited < grace * 10)) || break
    sleep 0.1
  done
  for pid in "${!started[@]}"; do echo "$pid"; done
}

# guard_trainers GRACE: --local's guard (see launch_local), in a session of its own. Reads "PID LOG" for each trainer
# from its input, a pipe whose other end launch.sh holds, until the end of it: launch.sh is gone then, however it
# ended (the kernel closes a killed process's files; a SIGKILL runs no trap). Its trainers ended with it, or were
# stopped by it, unless it was killed: a trainer still running is then stopped as launch.sh stops one, SIGTERM (it
# saves and exits) and SIGKILL GRACE seconds later, each step noted in its log.
guard_trainers() {
  local grace=$1 pid log
  local -A logs=() started=()
  while read -r pid log; do
    logs[$pid]=$log
    started[$pid]=$(process_start "$pid")
  done
  local -a running=()
  for pid in "${!logs[@]}"; do
    [[ -n ${started[$pid]} && $(process_start "$pid") == "${started[$pid]}" ]] || continue
    echo "launch.sh: launch.sh ended without stopping this trainer (killed?): sending it SIGTERM (killed after" \
      "$grace s)" >> "${logs[$pid]}"
    running+=("$pid")
  done
  ((${#running[@]} > 0)) || return 0
  for pid in $(term_and_wait "$grace" "${running[@]}"); do
    echo "launch.sh: still running $grace s after SIGTERM; killing it" >> "${logs[$pid]}"
    kill -KILL "$pid" 2>/dev/null || true
  done
}

launch_local() {
  local count=$1
  shift
  local port python i guard
  python=$(python_of "$HERE/.venv")
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  stop_hosts_on_signals
  # The trainers run in sessions of their own (below), and no trap runs when launch.sh is killed (SIGKILL, the OOM
  # killer): they would train on with no one to stop them, holding the devices and the workdir against a relaunch.
  # The guard, in a session of its own too, stops them once launch.sh is gone (guard_trainers). Each trainer tells it
  # its pid itself, before the trainer's program starts, so that no trainer escapes it, however early launch.sh
  # dies; and does not keep launch.sh's end of the pipe (nor does the guard), so that it ends with launch.sh.
  exec {guard}> >(exec setsid bash -c \
    "$(declare -f process_start term_and_wait guard_trainers); guard_trainers $STOP_GRACE_S" > /dev/null 2>&1)
  for ((i = 0; i < count; i++)); do
    LOGS+=("$LOGDIR/process_$i.log")
    NAMES+=("process $i")
    new_log "${LOGS[-1]}"
    # In a session of its own: Ctrl-C sends SIGINT to the terminal's whole foreground process group, and a trainer
    # in launch.sh's took it for its stop, then launch.sh's SIGTERM for a second one, and exited without saving. Now
    # only launch.sh hears it, and hands each trainer one SIGTERM (the subshell execs setsid, which execs the
    # trainer: its pid is $!).
    (
      echo "$BASHPID ${LOGS[-1]}" >&"$guard"
      exec {guard}>&-
      ECHO_COORDINATOR="127.0.0.1:$port" ECHO_NUM_PROCESSES=$count ECHO_PROCESS_ID=$i \
        exec setsid "$python" -u "$HERE/train_pretrain.py" "$@" >> "${LOGS[-1]}" 2>&1 < /dev/null
    ) &
    PIDS+=($!)
  done
  echo "launch.sh: started $count local processes (coordinator 127.0.0.1:$port); logs in $LOGDIR"
  watch_hosts
}

main() {
  local mode="" count="" setup=""
  TPU="" ZONE="" PROJECT="" REMOTE_DIR="echo_jax_code" LOGDIR="echo_jax_logs"
  while (($# > 0)); do
    case $1 in
      --tpu) TPU=${2:?--tpu needs a name}; mode=tpu; shift 2 ;;
      --zone) ZONE=${2:?--zone needs a zone}; shift 2 ;;
      --project) PROJECT=${2:?--project needs a project}; shift 2 ;;
      --remote_dir) REMOTE_DIR=${2:?--remote_dir needs a directory}; shift 2 ;;
      --logdir) LOGDIR=${2:?--logdir needs a directory}; shift 2 ;;
      --local) count=${2:?--local needs a process count}; mode=local; shift 2 ;;
      --setup) setup=1; shift ;;
      --worker-run)
        local worker=${2:?} copy_id=${3:?}
        shift 3
        [[ ${1:-} == -- ]] && shift
        claim_session
        worker_run "$worker" "$copy_id" "$@" ;;
      --worker-attach) claim_session; worker_attach "${2:?}" "${3:?}" ;;
      --worker-setup) claim_session; worker_setup "${2:?}" "${3:?}" ;;
      --) shift; break ;;
      -h|--help) usage ;;
      *) die "unknown argument $1 (arguments for train_pretrain.py go after --)" ;;
    esac
  done
  [[ -n $mode ]] || usage
  local seconds
  for seconds in STOP_GRACE_S FAILED_STOP_GRACE_S REATTACH_WAIT_S REATTACH_STEADY_S; do
    [[ ${!seconds} =~ ^[0-9]+$ ]] || die "ECHO_$seconds must be a whole number of seconds, not '${!seconds}'"
  done
  if [[ $mode == tpu ]]; then
    [[ -n $ZONE ]] || die "--tpu needs --zone"
    [[ $REMOTE_DIR =~ ^[A-Za-z0-9_.-]+$ ]] || die "--remote_dir must be a plain directory name under ~"
  else
    [[ $count =~ ^[1-9][0-9]*$ ]] || die "--local needs a positive process count, got '$count'"
  fi
  if [[ -n $setup ]]; then
    [[ $mode == tpu ]] || die "--setup is for a pod: give --tpu NAME --zone ZONE"
    (($# == 0)) || die "--setup takes no train_pretrain.py arguments"
  else
    (($# > 0)) || die "no train_pretrain.py arguments after --"
    expand_flagfiles "$@"
    local repeated
    repeated=$(repeated_workdir_problem "${TRAIN_ARGS[@]}")
    [[ -z $repeated ]] || die "$repeated"
    WORKDIR=$(workdir_of "${TRAIN_ARGS[@]}")
    if [[ $mode == tpu ]]; then
      local problem
      problem=$(pod_workdir_problem "$WORKDIR")
      [[ -z $problem ]] || die "$problem"
    fi
  fi
  mkdir -p "$LOGDIR"
  LOGDIR=$(cd "$LOGDIR" && pwd)
  if [[ $mode == tpu ]]; then
    # Names this launch's sessions on the workers (claim_session): the time, and this shell's pid.
    LAUNCH_ID=$(date +%Y%m%dT%H%M%S)-$$
    SESSION_COUNT=0
    SESSIONS_DIR=$(mktemp -d)
    trap 'rm -rf "$SESSIONS_DIR"' EXIT
  fi
  if [[ -n $setup ]]; then
    setup_tpu
  elif [[ $mode == tpu ]]; then
    # The flagfiles' flags in their place: the workers have no copy of a flagfile outside the copied code, and there
    # a relative name would be relative to ~/REMOTE_DIR. They get the flags checked here, read from the files here.
    launch_tpu "${TRAIN_ARGS[@]}"
  else
    launch_local "$count" "$@"
  fi
}

main "$@"
