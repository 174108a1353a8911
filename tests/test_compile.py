"""`item-jax compile`: targets, collectives, and the tiny config's train step
compiled ahead of time for simulated CPU devices and, where libtpu is
installed (`pip install -e '.[compile]'`), for a small TPU slice."""

import importlib.util
import json

import pytest

from item_jax import cli
from item_jax.launch import compile as compile_lib
from item_jax.train.config import load_config, validate

GIB = 2**30
TINY = ("--config.model.image_size=32", "--config.model.patch_size=8",
        "--config.data.max_title_len=16", "--config.global_batch_size=16")


def tiny_config(*overrides):
  return load_config("configs/item_tiny.py", [*TINY, *overrides])


@pytest.mark.parametrize("name, devices, topology, hbm_gib, accelerator", [
    ("v4-32", 16, "v4:2x2x4", 32, "v4-32"),
    ("v5e-256", 256, "v5e:16x16", 16, "v5litepod-256"),
    ("v5litepod-16", 16, "v5e:4x4", 16, "v5litepod-16"),
    ("v5p-256", 128, "v5:4x4x8", 95, "v5p-256"),
    ("v6e-64", 64, "v6e:8x8", 32, "v6e-64"),
])
def test_tpu_targets(name, devices, topology, hbm_gib, accelerator):
  target = compile_lib.parse_target(name)
  assert (target.num_devices, target.topology_name, target.hbm_bytes,
          target.accelerator_type) == (devices, topology, hbm_gib * GIB, accelerator)


def test_cpu_targets_and_bad_names():
  target = compile_lib.parse_target("cpu-8", hbm_gib=0.5)
  assert (target.num_devices, target.topology_name, target.hbm_bytes) == (8, None, GIB // 2)
  assert compile_lib.parse_target("cpu-4").hbm_bytes is None
  for bad, message in (("v4-33", "v4-8, v4-16, v4-32"), ("v9-8", "unknown TPU"),
                       ("tpu", "expected e.g.")):
    with pytest.raises(ValueError, match=message):
      compile_lib.parse_target(bad)


def test_cli_reports_a_bad_topology_or_mesh_without_a_traceback(capsys):
  for argv, message in ((["--topology", "v4-33"], "v4 slices known here"),
                        (["--topology", "cpu-8", "--config.mesh.fsdp=3"],
                         "does not divide 8 devices")):
    with pytest.raises(SystemExit) as error:
      cli.main(["compile", "--config", "configs/item_tiny.py", *argv])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("item-jax compile: error: ")
    assert message in err and len(err.splitlines()) == 1


def test_collectives_are_counted_once_per_op():
  hlo = """
  %all-reduce-start = (f32[768]{0}) all-reduce-start(f32[768]{0} %p), replica_groups={}
  %all-reduce-done = f32[768]{0} all-reduce-done(%all-reduce-start)
  %ag = f32[16,768]{1,0} all-gather(f32[1,768]{1,0} %x), dimensions={0}
  %rs.1 = f32[48]{0} reduce-scatter(f32[768]{0} %g), dimensions={0}
  %fusion = f32[8]{0} fusion(f32[8]{0} %all-gather.3), kind=kLoop
  """
  assert compile_lib.count_collectives(hlo) == {
      "all-reduce": 1, "all-gather": 1, "reduce-scatter": 1}


def test_compile_needs_no_data_but_training_still_does():
  config = tiny_config()
  with pytest.raises(ValueError, match="data.dir is not set"):
    validate(config, 8)


@pytest.mark.timeout(300)
def test_fsdp_shards_weights_and_optimizer_state_on_simulated_devices():
  target = compile_lib.parse_target("cpu-8", hbm_gib=1.0)
  data_parallel = compile_lib.compile_train_step(tiny_config(), target, vocab_size=300)
  fsdp = compile_lib.compile_train_step(
      tiny_config("--config.mesh.data=1", "--config.mesh.fsdp=8"), target,
      vocab_size=300)
  assert data_parallel["mesh"] == {"data": 8, "fsdp": 1, "model": 1}
  assert fsdp["mesh"] == {"data": 1, "fsdp": 8, "model": 1}
  for report in (data_parallel, fsdp):
    memory = report["memory_per_device"]
    assert report["fits"] and report["devices"] == 8 and report["batch_per_device"] == 2
    assert memory["optimizer_state"] == pytest.approx(2 * memory["weights"], rel=0.01)
    assert memory["peak"] >= memory["arguments"] > memory["weights"]
    assert report["flops_per_device_xla"] > 0
  # Parameters whose embed dimension divides by 8 are split 8 ways.
  assert fsdp["memory_per_device"]["weights"] < data_parallel["memory_per_device"]["weights"] / 4
  assert "all-reduce" in data_parallel["collectives"]
  assert "all-gather" in fsdp["collectives"]
  assert data_parallel["parameters"] == fsdp["parameters"]


@pytest.mark.timeout(300)
def test_a_step_that_does_not_fit_fails_clearly(capsys):
  with pytest.raises(SystemExit) as error:
    cli.main(["compile", "--config", "configs/item_tiny.py", "--topology", "cpu-8",
              "--hbm-gib", "0.001", "--vocab-size", "300", *TINY])
  message = str(error.value)
  assert message.startswith("does not fit: cpu-8: the step needs")
  assert "--config.mesh.fsdp" in message


@pytest.mark.timeout(300)
def test_cli_prints_the_report_as_json(capsys):
  cli.main(["compile", "--config", "configs/item_tiny.py", "--topology", "cpu-4",
            "--vocab-size", "300", "--json", *TINY])
  report = json.loads(capsys.readouterr().out)
  assert report["devices"] == 4 and report["hbm_per_device"] is None
  assert report["compiled_for"] == "cpu (simulated devices)"


@pytest.mark.timeout(600)
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[compile]')")
def test_libtpu_compiles_the_step_for_a_v4_8_slice(capsys):
  cli.main(["compile", "--config", "configs/item_tiny.py", "--topology", "v4-8",
            "--vocab-size", "300", *TINY])
  report = capsys.readouterr().out
  assert "target v4-8 (v4:2x2x1; compiled for tpu (libtpu" in report
  assert "4 devices on 1 host" in report
  assert "of 32.00 GiB HBM: fits" in report
  assert "all-reduce" in report


@pytest.mark.timeout(600)
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[compile]')")
def test_libtpu_out_of_memory_is_reported_with_advice():
  config = load_config("configs/item_tiny.py", [
      "--config.global_batch_size=8192", "--config.model.image_size=224",
      "--config.model.patch_size=16"])
  with pytest.raises(compile_lib.DoesNotFitError) as error:
    compile_lib.compile_train_step(config, compile_lib.parse_target("v5e-1"), 300)
  message = str(error.value)
  assert "v5e-1: the step does not fit in device memory" in message
  assert "RESOURCE_EXHAUSTED" in message and "--config.mesh.fsdp" in message
