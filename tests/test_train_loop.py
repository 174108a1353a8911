"""The pre-training loop: mesh equivalence, resume, signals, divergence, checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from train_helpers import losses_by_step, tensorboard_scalars, tiny_settings
from item_jax.train import checkpoint as checkpoint_lib
from item_jax.train import sharding
from item_jax.train.loop import DivergedError, train
from item_jax.train.optimizer import make_optimizer


@pytest.fixture(scope="module")
def data_dir(prepared_catalogue):
  return str(prepared_catalogue[1])


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
  """8 data-parallel devices, 8 steps, uninterrupted."""
  workdir = tmp_path_factory.mktemp("reference")
  history = train(tiny_settings(data_dir, "--config.total_steps=8"), str(workdir))
  return workdir, losses_by_step(history)


def test_one_device_data_parallel_and_fsdp_give_the_same_losses(data_dir, tmp_path,
                                                              reference_run):
  _, reference = reference_run
  one_device = train(
      tiny_settings(data_dir, "--config.total_steps=8", "--config.mesh.data=1",
                    num_devices=1),
      str(tmp_path / "one"), devices=jax.devices()[:1])
  fsdp = train(
      tiny_settings(data_dir, "--config.total_steps=8", "--config.mesh.data=2",
                    "--config.mesh.fsdp=4"),
      str(tmp_path / "fsdp"))
  for history in (one_device, fsdp):
    losses = losses_by_step(history)
    assert sorted(losses) == list(range(1, 9))
    for step, loss in losses.items():
      assert loss == pytest.approx(reference[step], rel=2e-5), step
  assert len(set(reference.values())) > 1


def test_tensorboard_holds_every_task_loss(reference_run):
  workdir, reference = reference_run
  for task in ("loss", "itm", "mlm", "mim", "gmlm", "gmim", "grad_norm",
               "learning_rate", "skipped_records"):
    written = tensorboard_scalars(workdir, f"train/{task}")
    assert sorted(written) == list(range(1, 9)), task
  written = tensorboard_scalars(workdir, "train/loss")
  for step, loss in reference.items():
    assert written[step] == pytest.approx(loss, rel=1e-6)
  config = json.loads((workdir / "config.json").read_text())
  assert config["total_steps"] == 8 and config["model"]["size"] == "tiny"


def test_checkpoints_restore_onto_another_mesh(data_dir, reference_run):
  workdir, _ = reference_run
  settings = tiny_settings(data_dir, "--config.total_steps=8")
  optimizer = make_optimizer(settings.optimizer)
  checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", 3, 3)
  assert checkpointer.latest_step() == 8
  restored = {}
  for name, mesh_shape, devices in (
      ("dp8", {"data": 8, "fsdp": 1, "model": 1}, jax.devices()),
      ("fsdp4", {"data": 1, "fsdp": 4, "model": 1}, jax.devices()[:4])):
    mesh = sharding.make_mesh(mesh_shape, devices)
    _, abstract, shardings = sharding.abstract_train_state(
        settings.model, optimizer, mesh, 0)
    state, meta = checkpointer.restore(
        checkpoint_lib.abstract_with_shardings(abstract, shardings))
    assert meta["step"] == 8 and meta["next_example_index"] == 64
    kernel = state.params["layers"][0]["intermediate"]["kernel"].value
    assert kernel.sharding.mesh.shape == mesh.shape
    restored[name] = jax.device_get(state)
  checkpointer.close()
  for a, b in zip(jax.tree.leaves(restored["dp8"]), jax.tree.leaves(restored["fsdp4"])):
    np.testing.assert_array_equal(a, b)


def test_a_half_written_checkpoint_is_ignored(reference_run, tmp_path):
  workdir, _ = reference_run
  import shutil
  copy = tmp_path / "checkpoints"
  shutil.copytree(workdir / "checkpoints", copy)
  # What a crash in the middle of saving step 11 leaves behind.
  (copy / "11.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
  (copy / "11.orbax-checkpoint-tmp" / "state" / "partial").write_bytes(b"\0" * 10)
  checkpointer = checkpoint_lib.Checkpointer(copy, 3, 3)
  assert checkpointer.latest_step() == 8
  checkpointer.close()


def test_checkpoints_are_saved_only_when_due_or_forced(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", 3, 10)
  state = {"w": np.arange(4, dtype=np.float32)}
  saved = [step for step in range(1, 8)
           if checkpointer.save(step, state, {"step": step}, force=step == 7)]
  checkpointer.close()
  # No extra save at the first step: a run that stops at step k before its
  # first interval leaves exactly one checkpoint.
  assert saved == [3, 6, 7]


def _train_command(data_dir, workdir, *overrides):
  return [sys.executable, "-m", "item_jax", "train",
          "--config", "configs/item_tiny.py:runlocal", "--workdir", str(workdir),
          f"--config.data.dir={data_dir}", "--config.model.image_size=32",
          "--config.model.patch_size=8", "--config.data.max_title_len=16",
          "--config.global_batch_size=8", "--config.log_every_steps=1",
          "--config.optimizer.warmup_steps=2", "--config.total_steps=8",
          "--config.checkpoint_every_steps=2", *overrides]


def _wait_for(predicate, process, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if process.poll() is not None:
      raise AssertionError(f"training exited early with {process.returncode}")
    time.sleep(0.05)
  raise AssertionError("timed out")


WINDOW_TAGS = ("train/loss", "train/itm", "train/mlm", "train/mim", "train/gmlm",
               "train/gmim", "train/grad_norm", "train/nonfinite_steps")


@pytest.mark.timeout(600)
def test_a_killed_run_resumes_with_identical_losses(data_dir, tmp_path, reference_run):
  """Killed after a checkpoint that falls inside a log window (every 3 steps,
  checkpoints every 2): the resumed run logs the uninterrupted run's windows,
  step by step and metric by metric, not a shorter window after the resume."""
  reference_dir = tmp_path / "uninterrupted"
  train(tiny_settings(data_dir, "--config.total_steps=8",
                      "--config.log_every_steps=3",
                      "--config.checkpoint_every_steps=2"), str(reference_dir))
  workdir = tmp_path / "killed"
  command = _train_command(data_dir, workdir, "--config.log_every_steps=3")
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  _wait_for(lambda: (workdir / "checkpoints" / "4").exists(), process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  for tag in WINDOW_TAGS:
    expected = tensorboard_scalars(reference_dir, tag)
    resumed = tensorboard_scalars(workdir, tag)
    assert sorted(expected) == [1, 3, 6, 8], tag
    assert sorted(resumed) == sorted(expected), tag
    for step in expected:
      assert resumed[step] == pytest.approx(expected[step], rel=2e-5), (tag, step)


@pytest.mark.timeout(600)
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(data_dir, tmp_path):
  workdir = tmp_path / "terminated"
  process = subprocess.Popen(
      _train_command(data_dir, workdir, "--config.total_steps=400",
                     "--config.checkpoint_every_steps=1000"),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: list(workdir.glob("events.out.tfevents.*")), process)
  time.sleep(1.0)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=240)
  assert process.returncode == 0, stderr[-2000:]
  checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", 1000, 3)
  saved = checkpointer.all_steps()
  checkpointer.close()
  assert len(saved) == 1 and 1 <= saved[0] < 400
  assert "stopping at step" in stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(data_dir, tmp_path,
                                                       monkeypatch):
  from item_jax.data import indexed
  original = indexed.IndexedSource.batches

  def poisoned(self, start_step):
    for step, batch in enumerate(original(self, start_step), start=start_step):
      if step >= 2:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(indexed.IndexedSource, "batches", poisoned)
  workdir = tmp_path / "diverged"
  with pytest.raises(DivergedError, match="3 consecutive steps"):
    train(tiny_settings(data_dir, "--config.total_steps=8",
                        "--config.max_nonfinite_steps=3",
                        "--config.checkpoint_every_steps=1"), str(workdir))
  checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", 1, 10)
  steps = checkpointer.all_steps()
  assert steps, "the finite steps were checkpointed"
  settings = tiny_settings(data_dir, "--config.total_steps=8")
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
  _, abstract, shardings = sharding.abstract_train_state(
      settings.model, make_optimizer(settings.optimizer), mesh, 0)
  for step in steps:
    state, _ = checkpointer.restore(
        checkpoint_lib.abstract_with_shardings(abstract, shardings), step)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(
        jax.device_get(state.params)))
  checkpointer.close()


def _start_two_processes(data_dir, workdir, *overrides, port_offset):
  """Two training processes over jax.distributed, 4 simulated devices each."""
  port = 20000 + (os.getpid() + port_offset) % 20000
  environment = dict(os.environ)
  environment["XLA_FLAGS"] = environment["XLA_FLAGS"].replace(
      "--xla_force_host_platform_device_count=8",
      "--xla_force_host_platform_device_count=4")
  return [
      subprocess.Popen(
          _train_command(data_dir, workdir, *overrides,
                         "--coordinator", f"localhost:{port}",
                         "--num-processes", "2", "--process-id", str(index)),
          env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
          text=True)
      for index in range(2)]


@pytest.mark.timeout(600)
def test_two_processes_match_one_process_with_eight_devices(data_dir, tmp_path,
                                                            reference_run):
  """jax.distributed over localhost: 2 processes x 4 simulated CPU devices."""
  _, reference = reference_run
  workdir = tmp_path / "two_processes"
  processes = _start_two_processes(data_dir, workdir, port_offset=0)
  errors = [process.communicate(timeout=540)[1] for process in processes]
  for process, error in zip(processes, errors):
    assert process.returncode == 0, error[-3000:]
  losses = tensorboard_scalars(workdir, "train/loss")
  assert sorted(losses) == list(range(1, 9))
  for step, loss in losses.items():
    assert loss == pytest.approx(reference[step], rel=2e-5), step


@pytest.mark.timeout(600)
def test_a_signal_to_one_process_stops_both_at_the_same_step(data_dir, tmp_path):
  workdir = tmp_path / "two_processes_signalled"
  processes = _start_two_processes(data_dir, workdir, "--config.total_steps=400",
                                   "--config.checkpoint_every_steps=1000",
                                   port_offset=1)
  _wait_for(lambda: list(workdir.glob("events.out.tfevents.*")), processes[0])
  time.sleep(1.0)
  processes[1].send_signal(signal.SIGUSR1)  # only the second process hears it
  errors = [process.communicate(timeout=300)[1] for process in processes]
  for process, error in zip(processes, errors):
    assert process.returncode == 0, error[-3000:]
    assert "stopping at step" in error
  checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", 1000, 3)
  saved = checkpointer.all_steps()
  checkpointer.close()
  assert len(saved) == 1 and 1 <= saved[0] < 400


def test_a_stop_signal_is_saved_within_a_step_whatever_the_log_interval(
    data_dir, tmp_path, monkeypatch):
  """The host runs at most one step ahead of the devices. With slow steps
  (a matmul chain beside the real step), one log at the end and no periodic
  checkpoint, nothing else syncs: a host that ran ahead would have dispatched
  many steps before the SIGTERM sent half a second after step 4 is asked
  for, and would save only after all of them."""
  import threading

  import jax.numpy as jnp
  from item_jax.data import indexed
  from item_jax.train import loop
  make_step = loop.make_train_step
  original = indexed.IndexedSource.batches

  def slow_make_train_step(*args, **kwargs):
    real = make_step(*args, **kwargs)

    def step(state, batch):
      state, metrics = real(state, batch)
      x = jnp.full((384, 384), 1e-3) * state.step.astype(jnp.float32)
      for _ in range(40):
        x = jnp.tanh(x @ x)
      return state, {**metrics, "burn": jnp.mean(x)}
    return step

  def signalling(self, start_step):
    for step, batch in enumerate(original(self, start_step), start=start_step + 1):
      if step == 4:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
      yield batch

  monkeypatch.setattr(loop, "make_train_step", slow_make_train_step)
  monkeypatch.setattr(indexed.IndexedSource, "batches", signalling)
  workdir = tmp_path / "signalled"
  history = train(tiny_settings(data_dir, "--config.total_steps=60",
                                "--config.log_every_steps=1000",
                                "--config.checkpoint_every_steps=1000",
                                num_devices=1),
                  str(workdir), devices=jax.devices()[:1])
  checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", 1000, 3)
  saved = checkpointer.all_steps()
  checkpointer.close()
  # Here: 5 with the bound, 25 without it.
  assert len(saved) == 1 and 4 <= saved[0] <= 8, saved
  assert [entry["step"] for entry in history] == [1]
