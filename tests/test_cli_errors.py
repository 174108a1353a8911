"""A user's mistake ends every `item-jax` command in one line naming the file,
flag or field, with exit status 2 and no traceback; `--debug` (or
ITEM_JAX_DEBUG=1) shows the traceback, and bugs keep theirs. Without a TPU,
no command prints libtpu's lines about the TPU it looked for."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from item_jax import cli
from item_jax.errors import MissingInputError, UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs" / "item_tiny.py")


def fails_in_one_line(capsys, argv, command, *named):
  """Runs `item-jax ARGV`; returns its one stderr line after checking it."""
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = err.splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"item-jax {command}: error: "), lines[0]
  for name in named:
    assert str(name) in lines[0], (name, lines[0])
  return lines[0]


@pytest.fixture
def run_dir(tmp_path):
  """A work directory with a run's config.json (no checkpoint)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"seed": 0}))
  return workdir


@pytest.fixture
def fake_data(tmp_path):
  """A folder whose dataset.json has a test split (nothing is read from it)."""
  data = tmp_path / "data"
  data.mkdir()
  (data / "dataset.json").write_text(json.dumps({"splits": {"test": {}, "train": {}}}))
  return data


def test_the_commands_are_the_ones_tested_here():
  commands = cli.build_parser()._subparsers._group_actions[0].choices
  assert set(commands) == {"synth", "prepare", "train", "compile", "embed",
                           "neighbours", "categorize", "eval", "convert",
                           "demo"}


def test_synth_a_bad_flag_value(capsys, tmp_path):
  fails_in_one_line(capsys, ["synth", "--output", str(tmp_path / "c"),
                             "--num-products", "0"], "synth", "--num-products 0")
  assert not (tmp_path / "c").exists()


def test_prepare_a_missing_catalogue(capsys, tmp_path):
  missing = tmp_path / "nonexistent.csv"
  fails_in_one_line(capsys, ["prepare", "--catalogue", str(missing), "--output",
                             str(tmp_path / "out")], "prepare", "--catalogue", missing)


def test_prepare_a_missing_images_folder(capsys, tmp_path):
  catalogue = tmp_path / "catalogue.csv"
  catalogue.write_text("item_id,title,image\n1,a,a.jpg\n")
  fails_in_one_line(capsys, ["prepare", "--catalogue", str(catalogue), "--images",
                             str(tmp_path / "images"), "--output", str(tmp_path / "out")],
                    "prepare", "--images", "no such folder")


def test_train_an_unknown_config_field(capsys, tmp_path):
  fails_in_one_line(capsys, ["train", "--config", TINY_CONFIG, "--workdir",
                             str(tmp_path / "run"), "--config.optimizer.nope=1"],
                    "train", "optimizer.nope")


def test_train_a_missing_config_file(capsys, tmp_path):
  fails_in_one_line(capsys, ["train", "--config", str(tmp_path / "nope.py"),
                             "--workdir", str(tmp_path / "run")],
                    "train", tmp_path / "nope.py", "does not exist")


def test_compile_a_bad_topology(capsys):
  fails_in_one_line(capsys, ["compile", "--config", TINY_CONFIG, "--topology",
                             "v4-33"], "compile", "--topology 'v4-33'", "v4-32")


def test_embed_a_workdir_without_a_run(capsys, tmp_path, fake_data):
  line = fails_in_one_line(capsys, ["embed", "--workdir", str(tmp_path), "--data",
                                    str(fake_data), "--output", str(tmp_path / "e")],
                           "embed", f"no training run in {tmp_path}", "item-jax train")
  assert "--workdir" in line


def test_embed_a_split_the_data_does_not_have(capsys, tmp_path, run_dir, fake_data):
  fails_in_one_line(capsys, ["embed", "--workdir", str(run_dir), "--data",
                             str(fake_data), "--split", "nope", "--output",
                             str(tmp_path / "e")], "embed", "--split nope", "test, train")


def test_embed_a_run_without_a_checkpoint(capsys, tmp_path, prepared_catalogue):
  from item_jax.train.config import load_config
  _, prepared = prepared_catalogue
  workdir = tmp_path / "run"
  workdir.mkdir()
  config = load_config(TINY_CONFIG, [f"--config.data.dir={prepared}"])
  (workdir / "config.json").write_text(config.to_json_best_effort())
  fails_in_one_line(capsys, ["embed", "--workdir", str(workdir), "--data",
                             str(prepared), "--output", str(tmp_path / "e")],
                    "embed", "no complete checkpoint", workdir)


def test_eval_a_workdir_without_a_run(capsys, tmp_path):
  fails_in_one_line(capsys, ["eval", "--workdir", str(tmp_path), "--data",
                             str(tmp_path)], "eval", f"no training run in {tmp_path}")


def test_eval_data_that_was_not_prepared(capsys, tmp_path, run_dir):
  fails_in_one_line(capsys, ["eval", "--workdir", str(run_dir), "--data",
                             str(tmp_path / "none")], "eval", "--data",
                    "no dataset.json", "item-jax prepare")


def test_eval_an_unknown_baseline(capsys, run_dir, fake_data):
  fails_in_one_line(capsys, ["eval", "--workdir", str(run_dir), "--data",
                             str(fake_data), "--baselines", "tfidf,nope"],
                    "eval", "unknown baselines ['nope']")


def test_categorize_a_workdir_without_a_run(capsys, tmp_path, fake_data):
  fails_in_one_line(capsys, ["categorize", "--workdir", str(tmp_path), "--data",
                             str(fake_data), "--output", str(tmp_path / "p.csv")],
                    "categorize", "--workdir", f"no training run in {tmp_path}")


def test_categorize_missing_embeddings(capsys, tmp_path, run_dir):
  fails_in_one_line(capsys, ["categorize", "--workdir", str(run_dir), "--embeddings",
                             str(tmp_path / "nope"), "--output", str(tmp_path / "p.csv")],
                    "categorize", "--embeddings", "nope.npy")


@pytest.mark.parametrize("layout, arguments, named", [
    ("export", ["--workdir", "{tmp}", "--output", "{tmp}/out"], ["no training run in"]),
    ("hf-bert", ["{tmp}/missing", "--workdir", "{tmp}/w"], ["checkpoint", "no such folder"]),
    ("hf-vit", ["{tmp}/missing", "--workdir", "{run}"], ["checkpoint", "no such folder"]),
    ("import", ["{tmp}", "--workdir", "{tmp}/w"], ["config.json", "no such file"]),
    ("torch", ["--workdir", "{tmp}/w"], ["give either CHECKPOINT"]),
    ("reshard", ["--workdir", "{run}", "--output", "{tmp}/o", "--mesh", "data=x"],
     ["--mesh 'data=x'"]),
    ("export", ["--workdir", "{run}", "--output", "{tmp}/o", "--config.seed=1"],
     ["--config.* overrides need --config"]),
])
def test_convert_missing_inputs_and_bad_flags(capsys, tmp_path, run_dir, layout,
                                              arguments, named):
  argv = [argument.format(tmp=tmp_path, run=run_dir) for argument in arguments]
  fails_in_one_line(capsys, ["convert", layout, *argv], f"convert {layout}", *named)


def test_demo_a_bad_override_fails_before_anything_is_written(capsys, tmp_path):
  fails_in_one_line(capsys, ["demo", "--workdir", str(tmp_path / "demo"),
                             "--config.nope=1"], "demo", "unknown config field 'nope'")
  assert not (tmp_path / "demo").exists()


def test_argparse_errors_also_exit_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["synth"])
  assert exit_info.value.code == 2
  assert "--output" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after", "environment"])
def test_debug_shows_the_traceback(monkeypatch, tmp_path, where):
  argv = ["prepare", "--catalogue", str(tmp_path / "none.csv"), "--output",
          str(tmp_path / "out")]
  if where == "before":
    argv = ["--debug", *argv]
  elif where == "after":
    argv = [*argv, "--debug"]
  else:
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(MissingInputError, match="--catalogue"):
    cli.main(argv)


def test_debug_after_a_convert_layout(tmp_path):
  with pytest.raises(UserError, match="no training run"):
    cli.main(["convert", "export", "--workdir", str(tmp_path), "--output",
              str(tmp_path / "o"), "--debug"])


@pytest.mark.parametrize("bug", [ZeroDivisionError("division by zero"),
                                 ValueError("a bug deep inside a library")])
def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, bug):
  def broken(args):
    raise bug
  monkeypatch.setattr(cli.data, "_synth", broken)
  with pytest.raises(type(bug), match=str(bug)):
    cli.main(["synth", "--output", str(tmp_path / "c")])


def test_a_bug_shows_a_traceback_in_a_subprocess(tmp_path):
  # What a person sees: Python's traceback, not a one-line error.
  script = ("import sys; from item_jax import cli\n"
            "def broken(args): raise ZeroDivisionError('division by zero')\n"
            "cli.data._synth = broken\n"
            f"cli.main(['synth', '--output', {str(tmp_path / 'c')!r}])\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
  assert result.returncode == 1
  assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def _without_jax_platforms():
  env = {name: value for name, value in os.environ.items()
         if name != "JAX_PLATFORMS"}
  # What `item-jax compile` sets in this process for libtpu's compile-only path.
  for name in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID",
               "TPU_SKIP_MDS_QUERY", "ALLOW_MULTIPLE_LIBTPU_LOAD"):
    env.pop(name, None)
  return env


@pytest.mark.timeout(300)
def test_no_tpu_lines_without_a_tpu(tmp_path):
  env = _without_jax_platforms()
  if cli.tpu_present(env):
    pytest.skip("a TPU is here: JAX may talk about it")
  # `train` asks JAX for its devices, then finds the data folder empty.
  result = subprocess.run(
      [sys.executable, "-m", "item_jax", "train", "--config", TINY_CONFIG,
       "--workdir", str(tmp_path / "run"), f"--config.data.dir={tmp_path}"],
      capture_output=True, text=True, timeout=280, cwd=ROOT, env=env)
  assert result.returncode == 2, result.stderr
  assert "TPU" not in result.stderr
  assert result.stderr.splitlines() == [
      f"item-jax train: error: config.data.dir={tmp_path}: no dataset.json "
      "there; run `item-jax prepare` first"]


def test_tpu_presence_from_the_environment():
  assert cli.tpu_present({"TPU_ACCELERATOR_TYPE": "v5litepod-8"})
  assert cli.tpu_present({"JAX_FORCE_TPU_INIT": "1"})


def test_platforms_without_the_tpu(monkeypatch, tmp_path):
  monkeypatch.delenv("PJRT_NAMES_AND_LIBRARY_PATHS", raising=False)
  plugins = tmp_path / "jax_plugins"
  (plugins / "xla_cuda12").mkdir(parents=True)
  (plugins / "xla_cuda12" / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  real_exists = os.path.exists
  monkeypatch.setattr(os.path, "exists", lambda path: path == "/dev/nvidiactl"
                      or real_exists(path))
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
  assert cli.non_tpu_platforms() == "cuda,cpu"
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden
  assert cli.non_tpu_platforms() == "cpu"
  (plugins / "xla_other").mkdir()
  (plugins / "xla_other" / "__init__.py").write_text("")
  assert cli.non_tpu_platforms() is None  # an unknown plugin: JAX chooses
