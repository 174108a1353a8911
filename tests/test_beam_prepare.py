"""`prepare` on Apache Beam writes, byte for byte, the local converter's
dataset, with 1 or 2 workers; an interrupted run leaves no dataset."""

import filecmp
import pathlib

import pytest

pytest.importorskip("apache_beam")

from item_jax.cli import main  # noqa: E402
from item_jax.data import beam_prepare  # noqa: E402
from item_jax.data import catalogue  # noqa: E402
from item_jax.data import images as images_lib  # noqa: E402
from item_jax.data import pipeline  # noqa: E402
from item_jax.data import prepare  # noqa: E402
from item_jax.errors import UserError  # noqa: E402
import tensorflow as tf  # noqa: E402
from test_prepare import IMAGE_FILES, NON_UTF8_LINES, ROWS, _write_csv  # noqa: E402

HEADER = ["item_id", "title", "image", "product_id", "category", "group"]
# Every row kind test_prepare checks (broken photos, duplicates, empty
# titles, non-UTF-8 text), with groups, a quoted title over two lines, a
# duplicate whose first row is skipped for its empty title, and a blank line.
BEAM_ROWS = [(*row, f"G{index % 5}" if index % 3 else "") for index, row in enumerate(ROWS)] + [
    ("emptytitle", "claimed by the empty title", "good.jpg", "", "", ""),
    ("twolines", "a title\nover two lines", "good.jpg", "P7", "Fashion>Shirts", "G1"),
    ("nothing", "", "", "", "", ""),
    ("odd\u2028id", "a title", "garbage.jpg", "", "", ""),   # a JSON-safe line break
]


def _catalogue(root: pathlib.Path, suffix=".csv") -> pathlib.Path:
  (root / "images").mkdir(exist_ok=True)
  for name, data in IMAGE_FILES.items():
    (root / "images" / name).write_bytes(data)
  path = root / f"catalogue{suffix}"
  _write_csv(path, HEADER, BEAM_ROWS, b"\n" + NON_UTF8_LINES.replace(b",,\n", b",,,\n"))
  return path


def _files(folder: pathlib.Path) -> list[str]:
  return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def _same_files(first: pathlib.Path, second: pathlib.Path) -> None:
  assert _files(first) == _files(second)
  for name in _files(first):
    assert filecmp.cmp(first / name, second / name, shallow=False), name


@pytest.fixture(scope="module")
def catalogue_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("beam")
  return root, _catalogue(root)


@pytest.mark.parametrize("modalities,split_by", [("both", "product"), ("any", "group")])
def test_beam_writes_the_local_dataset_byte_for_byte(catalogue_root, modalities, split_by):
  root, path = catalogue_root
  common = dict(num_shards=3, vocab_size=120, max_image_side=24, seed=5,
                modalities=modalities, split_by=split_by, tokenizer_sample=20)
  local = root / f"local-{modalities}"
  info = prepare.prepare(str(path), str(root / "images"), str(local), num_workers=0, **common)
  assert info["num_skipped"] and info["categories"] and info["image"]["num_reencoded"]
  assert info["tokenizer_titles"]["sampled"] == 20 < info["tokenizer_titles"]["kept"]
  # Blocks of 4 rows: duplicates, categories and the title sample cross blocks.
  beam = root / f"beam-{modalities}"
  beam_info = prepare.prepare(
      str(path), str(root / "images"), str(beam), **common,
      converter=beam_prepare.converter("FnApiRunner", records_per_block=4))
  assert beam_info == info
  _same_files(local, beam)
  assert not (beam / beam_prepare.SCRATCH).exists()


def test_two_workers_write_the_same_bytes_as_one(catalogue_root):
  root, path = catalogue_root
  common = dict(num_shards=2, vocab_size=120, max_image_side=24)
  one = root / "one-worker"
  prepare.prepare(str(path), str(root / "images"), str(one), **common,
                  converter=beam_prepare.converter("FnApiRunner", records_per_block=5))
  two = root / "two-workers"
  prepare.prepare(
      str(path), str(root / "images"), str(two), **common,
      converter=beam_prepare.converter(
          "DirectRunner", {"direct_num_workers": "2",
                           "direct_running_mode": "multi_processing"},
          records_per_block=3))
  _same_files(one, two)


def test_blocks_read_back_every_row_of_csv_and_jsonl(tmp_path):
  path = _catalogue(tmp_path)
  whole = list(catalogue.read_catalogue(str(path)))
  duplicates = {listing.row for listing, reason in whole
                if reason == catalogue.DUPLICATE_ITEM_ID}
  assert len(duplicates) == 2
  for size in (1, 4, 1000):
    blocks = catalogue.blocks(str(path), size)
    assert sum(block.num_records for block in blocks) == len(whole)
    parts = [row for block in blocks
             for row in catalogue.read_catalogue(str(path), block=block,
                                                 duplicate_rows=duplicates)]
    assert parts == whole
  jsonl = tmp_path / "catalogue.jsonl"
  jsonl.write_bytes(b'\xef\xbb\xbf{"item_id": "a", "title": "t", "image": "i"}\n\n'
                    b'{broken\n{"item_id": "b", "title": "caf\xc3\xa9", "image": "i"}\n\n'
                    b'{"item_id": "a", "title": "again", "image": "i"}\n')
  whole = list(catalogue.read_catalogue(str(jsonl)))
  assert [reason for _, reason in whole] == [
      None, catalogue.MALFORMED_ROW, None, catalogue.DUPLICATE_ITEM_ID]
  blocks = catalogue.blocks(str(jsonl), 2)
  assert [(block.first_line, block.num_records) for block in blocks] == [(1, 2), (4, 2)]
  assert [row for block in blocks for row in catalogue.read_catalogue(
      str(jsonl), block=block, duplicate_rows={6})] == whole


def test_an_interrupted_run_leaves_no_dataset(catalogue_root, tmp_path, monkeypatch):
  root, path = catalogue_root
  output = tmp_path / "out"
  prepare.prepare(str(path), str(root / "images"), str(output), num_shards=2,
                  vocab_size=120, num_workers=0)
  assert (output / prepare.DATASET_INFO_FILE).exists()
  real = images_lib.read_and_encode

  def fail_on_one(image_path, max_side):
    if image_path and image_path.endswith("exif.jpg"):
      raise RuntimeError("worker lost")
    return real(image_path, max_side)
  monkeypatch.setattr(images_lib, "read_and_encode", fail_on_one)
  with pytest.raises(Exception, match="worker lost"):
    prepare.prepare(str(path), str(root / "images"), str(output), num_shards=2,
                    vocab_size=120,
                    converter=beam_prepare.converter("FnApiRunner", records_per_block=4))
  # The earlier conversion's dataset.json is withdrawn: training refuses the
  # folder until a run completes.
  assert not (output / prepare.DATASET_INFO_FILE).exists()
  with pytest.raises(UserError, match="prepare"):
    pipeline.load_dataset_info(str(output))


def test_bad_beam_options_fail_before_any_work(catalogue_root, tmp_path, capsys):
  root, path = catalogue_root
  with pytest.raises(UserError, match="no_such_option"):
    beam_prepare.converter("FnApiRunner", {"no_such_option": "1"})
  with pytest.raises(UserError, match="key=value"):
    beam_prepare.parse_beam_options("direct_num_workers=")
  assert beam_prepare.parse_beam_options(" a=1, b = x=y ,save_main_session") == {
      "a": "1", "b": "x=y", "save_main_session": None}
  beam_prepare.converter("FnApiRunner", {"save_main_session": None})   # a bare flag
  with pytest.raises(UserError, match="rejected"):
    beam_prepare.converter("FnApiRunner", {"direct_num_workers": "two"})
  output = tmp_path / "out"
  for flags, message in ((["--beam-options", "direct_num_workers=2"],
                          "--beam-options needs --runner"),
                         (["--runner", "FnApiRunner", "--beam-options", "bogus=1"],
                          "unknown Beam pipeline options")):
    with pytest.raises(SystemExit) as exit_:
      main(["prepare", "--catalogue", str(path), "--output", str(output), *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
  assert not output.exists()


def test_a_rerun_over_an_earlier_dataset_leaves_nothing_of_it(catalogue_root, tmp_path):
  root, path = catalogue_root
  small = tmp_path / "small.csv"
  _write_csv(small, HEADER, BEAM_ROWS[:2])
  reused = tmp_path / "reused"
  prepare.prepare(str(path), str(root / "images"), str(reused), num_shards=4,
                  vocab_size=120, num_workers=0)
  # Two listings reach 2 of the 4 shards of one split at most: the others
  # must come out empty, not keep the earlier conversion's records.
  fresh = tmp_path / "fresh"
  for output in (reused, fresh):
    prepare.prepare(str(small), str(root / "images"), str(output), num_shards=4,
                    vocab_size=120,
                    converter=beam_prepare.converter("FnApiRunner", records_per_block=1))
  for name in _files(fresh):
    assert filecmp.cmp(fresh / name, reused / name, shallow=False), name


def test_text_columns_are_kept_the_same_way_by_both(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "good.jpg").write_bytes(IMAGE_FILES["good.jpg"])
  path = tmp_path / "catalogue.csv"
  _write_csv(path, ["item_id", "title", "image", "description", "brand"], [
      (f"id{i}", f"lamp number {i}", "good.jpg", f"a lamp\nof steel {i}" if i % 2 else "",
       "Acme" if i % 3 else "") for i in range(12)])
  local = tmp_path / "local"
  info = prepare.prepare(str(path), str(tmp_path / "images"), str(local), num_shards=2,
                         vocab_size=60, num_workers=0, text_columns=("description", "brand"))
  assert info["text_columns"] == ["description", "brand"]
  beam = tmp_path / "beam"
  prepare.prepare(str(path), str(tmp_path / "images"), str(beam), num_shards=2,
                  vocab_size=60, text_columns=("description", "brand"),
                  converter=beam_prepare.converter("FnApiRunner", records_per_block=5))
  _same_files(local, beam)
  records = {}
  for name in info["splits"]["train"]["files"] + info["splits"]["test"]["files"] + \
      info["splits"]["validation"]["files"]:
    for record in tf.data.TFRecordDataset(str(local / name)).map(
        pipeline.parse_record).as_numpy_iterator():
      records[record["item_id"].decode()] = record["text"].decode()
  assert records["id1"] == "a lamp\nof steel 1\nAcme"
  assert records["id3"] == "a lamp\nof steel 3"      # brand empty: left out
  assert records["id0"] == ""
  with pytest.raises(UserError, match="no column 'colour' \\(named by --text-columns\\)"):
    prepare.prepare(str(path), str(tmp_path / "images"), str(tmp_path / "bad"),
                    num_workers=0, text_columns=("colour",))
