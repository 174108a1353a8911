"""The launch scripts: shellcheck, the exact gcloud commands of the TPU pod
launcher (--dry-run), local.sh's process commands, and the SLURM script's
stop -> checkpoint -> requeue logic against stand-in srun/scontrol commands.
A real SLURM run is tests/integration/test_slurm.sh (too heavy for here)."""

import glob
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from item_jax import __version__
from item_jax.launch import tpu_pod

REPO = pathlib.Path(__file__).resolve().parent.parent
WHEEL = f"item_jax-{__version__}-py3-none-any.whl"
SCRIPTS = sorted(glob.glob(str(REPO / "launch" / "*.sh"))
                 + glob.glob(str(REPO / "launch" / "*.sbatch"))
                 + glob.glob(str(REPO / "tests" / "integration" / "*.sh"))
                 + glob.glob(str(REPO / "benchmarks" / "*.sh")))


@pytest.fixture
def clean_environment(monkeypatch):
  for name in os.environ:
    if name.startswith("ITEM_JAX_"):
      monkeypatch.delenv(name)


def dry_run(capsys, *argv):
  assert tpu_pod.main([*argv, "--dry-run"]) == 0
  return capsys.readouterr().out.splitlines()


def test_every_launch_script_passes_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck; "
                ".ci/run installs it)")
  assert len(SCRIPTS) >= 5, SCRIPTS
  result = subprocess.run(["shellcheck", "--external-sources", *SCRIPTS],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_v4_32_pod_commands(capsys, clean_environment):
  location = "--project=my-project --zone=us-central2-b"
  assert dry_run(capsys, "create", "my-pod", "--project", "my-project",
                 "--accelerator-type", "v4-32") == [
      f"gcloud compute tpus tpu-vm create my-pod {location} "
      "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"]

  ssh = f"gcloud compute tpus tpu-vm ssh my-pod {location} --worker=all"
  assert dry_run(capsys, "run", "my-pod", "--project", "my-project",
                 "--bucket", "my-bucket", "--config", "configs/item_base.py",
                 "--config.mesh.fsdp=4") == [
      f"{ssh} '--command=mkdir -p ~/item-jax && cd ~/item-jax && "
      "python3 -m pip install --quiet --user uv && "
      "~/.local/bin/uv venv --quiet --allow-existing --python 3.11 venv && "
      f"gcloud storage cp \"gs://my-bucket/wheels/{WHEEL}\" . && "
      "~/.local/bin/uv pip install --quiet --python venv/bin/python "
      f"\"./{WHEEL}[tpu]\"'",
      "gcloud compute tpus tpu-vm scp configs/item_base.py "
      f"my-pod:item-jax/config.py {location} --worker=all",
      f"{ssh} '--command=cd ~/item-jax && if [ -f train.pid ] && kill -0 "
      "\"$(cat train.pid)\" 2>/dev/null; then echo \"already training: pid "
      "$(cat train.pid)\" >&2; exit 1; fi && (setsid nohup venv/bin/item-jax "
      "train --config config.py --workdir gs://my-bucket/runs/my-pod "
      "--distributed --config.mesh.fsdp=4 --config.data.dir=gs://my-bucket/prepared"
      " >> train.log 2>&1 < /dev/null & echo $! > train.pid) && "
      "echo \"started on $(hostname): pid $(cat train.pid)\"'"]

  assert dry_run(capsys, "logs", "my-pod", "--project", "my-project",
                 "--follow") == [
      f"gcloud compute tpus tpu-vm ssh my-pod {location} --worker=0 "
      "'--command=tail -n 100 -f ~/item-jax/train.log'"]
  assert dry_run(capsys, "stop", "my-pod", "--project", "my-project") == [
      f"{ssh} '--command=cd ~/item-jax && if [ -f train.pid ] && kill -0 "
      "\"$(cat train.pid)\" 2>/dev/null; then kill -TERM \"$(cat train.pid)\" && "
      "timeout 600 tail --pid=\"$(cat train.pid)\" -f /dev/null; echo \"stopped "
      "on $(hostname)\"; else echo \"not training on $(hostname)\"; fi'"]
  assert dry_run(capsys, "delete", "my-pod", "--project", "my-project") == [
      f"gcloud compute tpus tpu-vm delete my-pod {location} --quiet"]


def test_v5e_queued_resource_commands_from_the_environment(capsys, monkeypatch,
                                                           clean_environment):
  monkeypatch.setenv("ITEM_JAX_PROJECT", "my-project")
  monkeypatch.setenv("ITEM_JAX_ZONE", "us-west4-a")
  monkeypatch.setenv("ITEM_JAX_ACCELERATOR_TYPE", "v5e-256")
  monkeypatch.setenv("ITEM_JAX_QUEUED", "1")
  monkeypatch.setenv("ITEM_JAX_SERVICE_ACCOUNT", "item@my-project.iam.gserviceaccount.com")
  location = "--project=my-project --zone=us-west4-a"
  assert dry_run(capsys, "create", "v5e-pod", "--spot") == [
      f"gcloud compute tpus queued-resources create v5e-pod {location} "
      "--node-id=v5e-pod --accelerator-type=v5litepod-256 "
      "--runtime-version=v2-alpha-tpuv5-lite --spot "
      "--service-account=item@my-project.iam.gserviceaccount.com"]

  revision = "git+https://github.com/example/item-jax@0123abc"
  run = dry_run(capsys, "run", "v5e-pod", "--package", revision,
                "--workdir", "gs://runs/v5e", "--config",
                "configs/item_base.py:runlocal", "--config.data.dir=gs://data/prepared",
                "--skip-install")
  assert run == [
      "gcloud compute tpus tpu-vm scp configs/item_base.py "
      f"v5e-pod:item-jax/config.py {location} --worker=all",
      f"gcloud compute tpus tpu-vm ssh v5e-pod {location} --worker=all "
      "'--command=cd ~/item-jax && if [ -f train.pid ] && kill -0 "
      "\"$(cat train.pid)\" 2>/dev/null; then echo \"already training: pid "
      "$(cat train.pid)\" >&2; exit 1; fi && (setsid nohup venv/bin/item-jax "
      "train --config config.py:runlocal --workdir gs://runs/v5e --distributed "
      "--config.data.dir=gs://data/prepared >> train.log 2>&1 < /dev/null & "
      "echo $! > train.pid) && echo \"started on $(hostname): pid "
      "$(cat train.pid)\"'"]
  install = tpu_pod.install_script(revision, "3.11")
  assert install.endswith(f"--python venv/bin/python \"item-jax[tpu] @ {revision}\"")

  assert dry_run(capsys, "status", "v5e-pod") == [
      f"gcloud compute tpus queued-resources describe v5e-pod {location}"]
  assert dry_run(capsys, "delete", "v5e-pod") == [
      f"gcloud compute tpus queued-resources delete v5e-pod {location} "
      "--force --quiet"]


def test_the_shell_wrapper_runs_the_launcher(clean_environment):
  result = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "create", "pod", "--dry-run",
       "--accelerator-type", "v5p-256"],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
  assert result.returncode == 0, result.stderr
  assert result.stdout == ("gcloud compute tpus tpu-vm create pod --zone=us-central2-b "
                           "--accelerator-type=v5p-256 --version=v2-alpha-tpuv5\n")


@pytest.mark.parametrize("argv, message", [
    (["run", "pod", "--config", "configs/item_base.py"], "--config.data.dir"),
    (["run", "pod", "--config", "nowhere.py", "--bucket", "b"], "no file nowhere.py"),
    (["create", "pod", "--accelerator-type", "v9-8"], "--runtime-version"),
])
def test_launcher_errors_say_what_is_missing(argv, message, clean_environment, capsys):
  with pytest.raises(SystemExit) as error:
    tpu_pod.main([*argv, "--dry-run"])
  assert message in str(error.value)


def test_launcher_refuses_unknown_flags(clean_environment, capsys):
  with pytest.raises(SystemExit):
    tpu_pod.main(["stop", "pod", "--config.mesh.fsdp=2"])
  assert "unrecognized arguments" in capsys.readouterr().err


def test_local_sh_starts_one_process_per_rank():
  result = subprocess.run(
      ["bash", "launch/local.sh", "--processes", "2", "--devices-per-process", "4",
       "--port", "12345", "--dry-run", "--config", "configs/item_tiny.py:runlocal",
       "--workdir", "runs/local", "--config.data.dir=runs/demo/prepared"],
      cwd=REPO, capture_output=True, text=True,
      env={**os.environ, "PYTHON": "python3", "XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr
  common = ("env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 "
            "python3 -m item_jax train --config configs/item_tiny.py:runlocal "
            "--workdir runs/local --config.data.dir=runs/demo/prepared "
            "--coordinator localhost:12345 --num-processes 2 --process-id")
  assert result.stdout.splitlines() == [f"{common} 0", f"{common} 1"]


# -- the SLURM script's signal handling, with stand-ins for srun and scontrol --

_FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$CALLS"
echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS XLA_FLAGS=$XLA_FLAGS" >> "$CALLS"
trap 'echo "training: USR1, checkpoint saved" >> "$CALLS"; exit 0' USR1
trap 'echo "training: TERM, checkpoint saved" >> "$CALLS"; exit 0' TERM
while true; do sleep 0.05; done
"""
_FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$CALLS"
"""


def _start_batch_script(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("srun", _FAKE_SRUN), ("scontrol", _FAKE_SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  calls = tmp_path / "calls.txt"
  environment = {
      "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
      "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "2",
      "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4",
      "ITEM_JAX_WORKDIR": "/shared/runs/base", "ITEM_JAX_DATA": "/shared/prepared",
  }
  process = subprocess.Popen(
      ["bash", "launch/slurm_gpu.sbatch", "--config.mesh.fsdp=8"], cwd=REPO,
      env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 30
  while not (calls.exists() and "srun" in calls.read_text()):
    assert time.time() < deadline and process.poll() is None, process.communicate()
    time.sleep(0.05)
  return process, calls


@pytest.mark.parametrize("signum, requeued", [(signal.SIGUSR1, True),
                                              (signal.SIGTERM, False)])
def test_slurm_script_checkpoints_then_requeues_on_usr1_only(tmp_path, signum, requeued):
  process, calls = _start_batch_script(tmp_path)
  process.send_signal(signum)
  output, _ = process.communicate(timeout=30)
  assert process.returncode == 0, output
  lines = calls.read_text().splitlines()
  assert lines[0] == ("srun --kill-on-bad-exit=1 item-jax train --config "
                      "configs/item_base.py --workdir /shared/runs/base --distributed "
                      "--config.data.dir=/shared/prepared --config.mesh.fsdp=8")
  # One process per node drives all 4 GPUs of its node.
  assert lines[1].startswith("JAX_LOCAL_DEVICE_IDS=0,1,2,3 XLA_FLAGS=")
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in lines[1]
  # The script passes the stop on to the training processes as USR1.
  assert lines[2] == "training: USR1, checkpoint saved"
  assert (lines[3:] == ["scontrol requeue 42"]) == requeued, lines
  assert "2 processes, 4 GPUs per node" in output


def test_worker_scripts_start_detached_refuse_a_second_start_and_stop(tmp_path):
  """The commands `run` and `stop` send to each worker, run here with a
  stand-in `item-jax` in ~/item-jax/venv."""
  home = tmp_path / "home"
  venv_bin = home / tpu_pod.REMOTE_DIR / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "item-jax").write_text(
      "#!/usr/bin/env bash\necho \"item-jax $*\"\n"
      "trap 'echo \"TERM: checkpoint saved\"; exit 0' TERM\n"
      "while true; do sleep 0.05; done\n")
  (venv_bin / "item-jax").chmod(0o755)
  environment = {**os.environ, "HOME": str(home)}
  start = tpu_pod.train_script("runlocal", "gs://b/runs/pod", ["--config.mesh.fsdp=2"])
  run = lambda script: subprocess.run(["bash", "-c", script], env=environment,
                                      capture_output=True, text=True, timeout=60)
  first = run(start)
  assert first.returncode == 0 and "started on" in first.stdout, first.stderr
  second = run(start)
  assert second.returncode == 1 and "already training" in second.stderr
  stopped = run(tpu_pod.STOP_SCRIPT)
  assert stopped.returncode == 0 and "stopped on" in stopped.stdout, stopped.stderr
  log = (home / tpu_pod.REMOTE_DIR / "train.log").read_text()
  assert log.splitlines() == [
      "item-jax train --config config.py:runlocal --workdir gs://b/runs/pod "
      "--distributed --config.mesh.fsdp=2", "TERM: checkpoint saved"]
  assert "not training" in run(tpu_pod.STOP_SCRIPT).stdout
  install = tpu_pod.install_script("gs://b/wheels/x.whl", "3.11")
  assert subprocess.run(["bash", "-n", "-c", install]).returncode == 0
