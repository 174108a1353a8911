"""prepare: which rows are kept or skipped (and why), image normal form, splits, schema."""

import csv
import io
import json
import pathlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from item_jax.data import catalogue
from item_jax.data import pipeline
from item_jax.data import prepare

RED, BLUE, WHITE = (230, 20, 20), (20, 20, 230), (255, 255, 255)
MAX_SIDE = 64


def _encoded(image: Image.Image, image_format: str = "JPEG", **options) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, image_format, **options)
  return buffer.getvalue()


def _two_colour(size, first, second, split="horizontal") -> Image.Image:
  """`first` on the top (or left) half, `second` on the other."""
  width, height = size
  pixels = np.empty((height, width, 3), np.uint8)
  if split == "horizontal":
    pixels[:height // 2], pixels[height // 2:] = first, second
  else:
    pixels[:, :width // 2], pixels[:, width // 2:] = first, second
  return Image.fromarray(pixels)


def _rgba_half_transparent() -> Image.Image:
  pixels = np.zeros((32, 32, 4), np.uint8)
  pixels[:, 16:] = (*RED, 255)  # The left half stays fully transparent black.
  return Image.fromarray(pixels, "RGBA")


def _rotated_by_exif() -> bytes:
  # Stored pixels are the upright picture turned 90° anticlockwise; EXIF
  # orientation 6 tells viewers to turn it back clockwise.
  upright = _two_colour((24, 48), RED, BLUE)
  exif = Image.Exif()
  exif[0x0112] = 6
  return _encoded(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


GOOD_JPEG = _encoded(_two_colour((32, 32), RED, BLUE), quality=95)
IMAGE_FILES = {
    "good.jpg": GOOD_JPEG,
    "zero.jpg": b"",
    "truncated.jpg": GOOD_JPEG[: len(GOOD_JPEG) // 2],
    "garbage.jpg": b"this is not an image at all" * 20,
    "gray.png": _encoded(Image.new("L", (16, 16), 128), "PNG"),
    "cmyk.jpg": _encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95),
    "rgba.png": _encoded(_rgba_half_transparent(), "PNG"),
    "exif.jpg": _rotated_by_exif(),
    "big.jpg": _encoded(_two_colour((200, 100), RED, BLUE, "vertical"), quality=95),
    "progressive.jpg": _encoded(_two_colour((32, 32), RED, BLUE), quality=95, progressive=True),
}
LONG_TITLE = " ".join(f"word{i}" for i in range(400))
# (item_id, title, image, product_id, category), then what prepare must do with it.
ROWS = [(f"ok{i}", f"cotton shirt number {i}", "good.jpg", f"P{i // 3}", "Fashion>Shirts")
        for i in range(24)] + [
    ("nocategory", "plain mug", "good.jpg", "", ""),
    ("missing", "a title", "nowhere.jpg", "", ""),
    ("noimage", "a title", "", "", ""),
    ("zero", "a title", "zero.jpg", "", ""),
    ("truncated", "a title", "truncated.jpg", "", ""),
    ("garbage", "a title", "garbage.jpg", "", ""),
    ("emptytitle", "", "good.jpg", "", ""),
    ("spacetitle", "  \t ", "good.jpg", "", ""),
    ("ok0", "the same id again", "good.jpg", "", ""),
    ("gray", "grey thing", "gray.png", "", "Home > Decor"),
    ("cmyk", "printed thing", "cmyk.jpg", "", "Home > Decor"),
    ("rgba", "cut-out thing", "rgba.png", "", ""),
    ("exif", "phone photo", "exif.jpg", "", ""),
    ("big", "large photo", "big.jpg", "", ""),
    ("progressive", "web photo", "progressive.jpg", "", ""),
    ("long", LONG_TITLE, "good.jpg", "", ""),
]
NON_UTF8_LINES = b"latin1,caf\xe9 cup,good.jpg,,\nid\xff,cup,good.jpg,,\n"
SKIPPED = {
    "missing": "missing image",
    "noimage": "missing image",
    "zero": "empty image file",
    "truncated": "truncated image",
    "garbage": "undecodable image",
    "emptytitle": "empty title",
    "spacetitle": "empty title",
    "ok0": "duplicate item_id",
    "latin1": "non-UTF-8 text",
    "id\\xff": "non-UTF-8 text",  # Undecodable bytes are shown escaped.
}
KEPT = {row[0] for row in ROWS} - set(SKIPPED) | {"ok0"}


def _write_csv(path: pathlib.Path, header, rows, extra_line: bytes = b""):
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  path.write_bytes(text.getvalue().encode("utf-8") + extra_line)


def _read_records(data_dir) -> dict[str, dict]:
  """item_id → the raw record (numpy), plus the split it is in."""
  info = pipeline.load_dataset_info(str(data_dir))
  records = {}
  for split, shards in info["splits"].items():
    files = [str(pathlib.Path(data_dir) / name) for name in shards["files"]]
    for record in tf.data.TFRecordDataset(files).map(pipeline.parse_record).as_numpy_iterator():
      records[record["item_id"].decode()] = {**record, "split": split}
  return records


def _pixels(jpeg: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("catalogue")
  (root / "images").mkdir()
  for name, data in IMAGE_FILES.items():
    (root / "images" / name).write_bytes(data)
  header = ["item_id", "title", "image", "product_id", "category"]
  _write_csv(root / "catalogue.csv", header, ROWS, NON_UTF8_LINES)
  info = prepare.prepare(
      str(root / "catalogue.csv"), str(root / "images"), str(root / "out"), num_shards=4,
      vocab_size=200, max_image_side=MAX_SIDE, num_workers=2,
  )
  return root, info, _read_records(root / "out")


def test_each_bad_row_is_skipped_with_its_reason(prepared):
  root, info, _ = prepared
  assert json.loads((root / "out" / "dataset.json").read_text()) == info
  assert {entry["item_id"]: entry["reason"] for entry in info["skipped"]} == SKIPPED
  rows = {entry["item_id"]: entry["row"] for entry in info["skipped"]}
  assert rows["ok0"] == 2 + ROWS.index(("ok0", "the same id again", "good.jpg", "", ""))
  assert rows["latin1"] == len(ROWS) + 2


def test_every_other_row_is_kept_once(prepared):
  _, info, records = prepared
  assert set(records) == KEPT
  assert sum(split["count"] for split in info["splits"].values()) == len(KEPT)
  assert records["ok0"]["title"].decode() == "cotton shirt number 0"  # The first ok0.
  assert records["long"]["title"].decode() == LONG_TITLE


def test_images_become_upright_rgb(prepared):
  _, _, records = prepared

  def colour_at(item_id, row, column):
    return _pixels(records[item_id]["image"])[row, column]

  np.testing.assert_allclose(colour_at("gray", 8, 8), (128,) * 3, atol=3)
  np.testing.assert_allclose(colour_at("cmyk", 8, 8), (255, 0, 0), atol=8)
  np.testing.assert_allclose(colour_at("rgba", 16, 4), WHITE, atol=8)
  np.testing.assert_allclose(colour_at("rgba", 16, 28), RED, atol=8)
  exif = _pixels(records["exif"]["image"])
  assert exif.shape == (48, 24, 3)
  np.testing.assert_allclose(exif[6, 12], RED, atol=12)
  np.testing.assert_allclose(exif[42, 12], BLUE, atol=12)


def test_baseline_jpegs_are_kept_as_is_and_others_reencoded(prepared):
  _, info, records = prepared
  assert records["ok1"]["image"] == GOOD_JPEG
  progressive = Image.open(io.BytesIO(records["progressive"]["image"]))
  assert progressive.format == "JPEG" and not progressive.info.get("progressive")
  big = _pixels(records["big"]["image"])
  assert big.shape == (MAX_SIDE // 2, MAX_SIDE, 3)
  np.testing.assert_allclose(big[16, 8], RED, atol=12)
  np.testing.assert_allclose(big[16, 56], BLUE, atol=12)
  assert info["image"]["num_reencoded"] == 6  # gray, cmyk, rgba, exif, big, progressive


def test_no_product_is_in_two_splits(prepared):
  _, _, records = prepared
  splits_of_product = {}
  for item_id, record in records.items():
    product = record["product_id"].decode() or f"item:{item_id}"
    splits_of_product.setdefault(product, set()).add(record["split"])
  assert all(len(splits) == 1 for splits in splits_of_product.values())
  assert len({record["split"] for record in records.values()}) > 1


def test_records_are_numbered_balanced_and_categorised(prepared):
  root, info, records = prepared
  for split, shards in info["splits"].items():
    assert shards["files"] == [f"{split}-{s:05d}-of-00004.tfrecord" for s in range(4)]
    assert all((root / "out" / name).exists() for name in shards["files"])
    assert max(shards["shard_counts"]) - min(shards["shard_counts"]) <= 1
    indices = sorted(r["index"] for r in records.values() if r["split"] == split)
    assert indices == list(range(shards["count"]))
  assert info["categories"] == ["Fashion > Shirts", "Home > Decor"]
  for record in records.values():
    category = record["category"].decode()
    expected = info["categories"].index(category) if category else -1
    assert record["category_id"] == expected
  assert (root / "out" / info["tokenizer"]).exists()


def test_split_depends_only_on_product_and_seed():
  fractions = (0.8, 0.1, 0.1)
  splits = [prepare.split_of_product(f"product:{i}", 0, fractions) for i in range(4000)]
  assert splits == [prepare.split_of_product(f"product:{i}", 0, fractions) for i in range(4000)]
  assert splits != [prepare.split_of_product(f"product:{i}", 1, fractions) for i in range(4000)]
  assert 0.77 < splits.count("train") / len(splits) < 0.83


def test_column_mapping_is_parsed():
  assert catalogue.parse_column_mapping("item_id=posting_id, product_id=label_group") == {
      "item_id": "posting_id", "product_id": "label_group"}
  with pytest.raises(ValueError, match="posting_id"):
    catalogue.parse_column_mapping("posting_id")
  with pytest.raises(ValueError, match="colour"):
    catalogue.parse_column_mapping("colour=color")


@pytest.mark.parametrize("columns, missing", [
    (None, "'title'"),
    ({"title": "name", "product_id": "label_group"}, "'label_group'"),
])
def test_missing_column_fails_naming_column_and_file(tmp_path, columns, missing):
  path = tmp_path / "listings.csv"
  _write_csv(path, ["item_id", "name", "image"], [("a", "shirt", "good.jpg")])
  with pytest.raises(ValueError, match=f"listings.csv has no column {missing}"):
    prepare.prepare(str(path), str(tmp_path), str(tmp_path / "out"), columns=columns,
                    num_workers=0)
  assert not (tmp_path / "out").exists()


def test_jsonl_with_renamed_columns_and_given_tokenizer(prepared, tmp_path):
  root, _, _ = prepared
  lines = [
      {"posting_id": 7, "name": "steel kettle", "img": "good.jpg", "label_group": 1,
       "category": ["Home", "Kitchen"]},
      {"posting_id": "8", "name": "steel kettle 1.7l", "img": "good.jpg", "label_group": 1},
      {"posting_id": "9", "name": "", "img": "good.jpg", "label_group": None},
  ]
  path = tmp_path / "listings.jsonl"
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
  columns = catalogue.parse_column_mapping("item_id=posting_id,title=name,image=img,"
                                           "product_id=label_group")
  tokenizer_model = root / "out" / "tokenizer.model"
  info = prepare.prepare(str(path), str(root / "images"), str(tmp_path / "out"),
                         columns=columns, tokenizer_model=str(tokenizer_model), num_workers=0)
  assert info["skipped"] == [{"row": 3, "item_id": "9", "reason": "empty title"}]
  assert info["columns"]["product_id"] == "label_group"
  assert (tmp_path / "out" / "tokenizer.model").read_bytes() == tokenizer_model.read_bytes()
  records = _read_records(tmp_path / "out")
  assert {item: (r["product_id"], r["category"]) for item, r in records.items()} == {
      "7": (b"1", b"Home > Kitchen"), "8": (b"1", b"")}
  assert records["7"]["split"] == records["8"]["split"]


def test_split_by_group_keeps_every_product_of_a_group_in_one_split(prepared, tmp_path):
  root, _, _ = prepared
  path = tmp_path / "groups.csv"
  rows = [(f"{group}-{product}-{listing}", f"shirt model {group} {product} {listing}",
           "good.jpg", f"P{group}-{product}", "", f"G{group}")
          for group in range(30) for product in range(4) for listing in range(2)]
  _write_csv(path, ["item_id", "title", "image", "product_id", "category", "group"], rows)
  tokenizer_model = str(root / "out" / "tokenizer.model")
  split = lambda split_by, out: {
      item: record["split"] for item, record in _read_records(
          _prepared_at(path, root, tmp_path / out, tokenizer_model, split_by)).items()}
  by_group, by_product = split("group", "by_group"), split("product", "by_product")
  splits_of = lambda splits, key: {
      name: {splits[item] for item in splits if key(item) == name}
      for name in {key(item) for item in splits}}
  group_of = lambda item: item.split("-")[0]
  assert all(len(s) == 1 for s in splits_of(by_group, group_of).values())
  assert len(set(by_group.values())) > 1
  # Split by product, products of one group scatter over the splits.
  assert any(len(s) > 1 for s in splits_of(by_product, group_of).values())
  assert json.loads((tmp_path / "by_group" / "dataset.json").read_text())["split_by"] == "group"


def _prepared_at(path, root, out, tokenizer_model, split_by):
  prepare.prepare(str(path), str(root / "images"), str(out), num_shards=2,
                  tokenizer_model=tokenizer_model, num_workers=0, split_by=split_by)
  return out


def test_split_by_group_needs_the_group_column(tmp_path):
  path = tmp_path / "listings.csv"
  _write_csv(path, ["item_id", "title", "image", "product_id"], [("a", "shirt", "good.jpg", "1")])
  with pytest.raises(ValueError, match="listings.csv has no column 'group'"):
    prepare.prepare(str(path), str(tmp_path), str(tmp_path / "out"), num_workers=0,
                    split_by="group")
  with pytest.raises(ValueError, match="split_by"):
    prepare.prepare(str(path), str(tmp_path), str(tmp_path / "out"), num_workers=0,
                    split_by="category")
  assert not (tmp_path / "out").exists()


# With --modalities any: what happens to each row that `both` skips.
ANY_EXTRA_ROWS = [("nothing", "", "", "", ""), ("badboth", " ", "garbage.jpg", "", "")]
ANY_KINDS = {
    "missing": ("title_only", "missing image"),
    "noimage": ("title_only", None),   # names no image: counted, not listed
    "zero": ("title_only", "empty image file"),
    "truncated": ("title_only", "truncated image"),
    "garbage": ("title_only", "undecodable image"),
    "emptytitle": ("image_only", None),
    "spacetitle": ("image_only", None),
}


@pytest.fixture(scope="module")
def prepared_any(prepared, tmp_path_factory):
  root, _, _ = prepared
  out = tmp_path_factory.mktemp("any")
  header = ["item_id", "title", "image", "product_id", "category"]
  _write_csv(out / "catalogue.csv", header, ROWS + ANY_EXTRA_ROWS, NON_UTF8_LINES)
  info = prepare.prepare(str(out / "catalogue.csv"), str(root / "images"),
                         str(out / "prepared"), num_shards=2, num_workers=0,
                         tokenizer_model=str(root / "out" / "tokenizer.model"),
                         max_image_side=MAX_SIDE, modalities="any")
  return out / "prepared", info, _read_records(out / "prepared")


def test_any_modalities_keep_single_input_rows_and_name_what_they_lost(prepared_any):
  _, info, records = prepared_any
  skipped = {entry["item_id"]: entry["reason"] for entry in info["skipped"]}
  assert skipped == {"ok0": "duplicate item_id", "latin1": "non-UTF-8 text",
                     "id\\xff": "non-UTF-8 text",
                     "nothing": "neither a title nor an image",
                     "badboth": "empty title, undecodable image"}
  assert set(records) == KEPT | set(ANY_KINDS)
  for item_id, (kind, reason) in ANY_KINDS.items():
    record = records[item_id]
    assert (bool(record["has_title"]), bool(record["has_image"])) == (
        kind != "image_only", kind != "title_only"), item_id
    assert (record["image"] == b"") == (kind == "title_only")
  assert {(entry["item_id"], entry["reason"]) for entry in info["without_image"]} == {
      (item, reason) for item, (_, reason) in ANY_KINDS.items() if reason}
  assert info["images_dropped"] == {"missing image": 1, "no image named": 1,
                                    "empty image file": 1, "truncated image": 1,
                                    "undecodable image": 1}
  assert info["listings"] == {"title_and_image": len(KEPT), "title_only": 5,
                              "image_only": 2}
  assert sum(sum(split["listings"].values()) for split in info["splits"].values()) \
      == len(records)
  assert info["modalities"] == "any"
  assert all(record["has_title"] and record["has_image"]
             for item, record in records.items() if item in KEPT)


def test_both_readers_give_presence_masks_and_blank_images(prepared_any):
  from item_jax.data.indexed import IndexedSource
  data_dir, info, records = prepared_any
  by_index = {(r["split"], int(r["index"])): r for r in records.values()}
  seen = 0
  for batch in pipeline.make_dataset(str(data_dir), "train", 8, 16, 12, training=False,
                                     process_index=0, process_count=1).as_numpy_iterator():
    for row in np.flatnonzero(batch["valid"]):
      record = by_index[("train", int(batch["index"][row]))]
      assert batch["has_title"][row] == bool(record["has_title"])
      assert batch["has_image"][row] == bool(record["has_image"])
      if not record["has_image"]:
        assert not batch["image"][row].any()
      seen += 1
  assert seen == info["splits"]["train"]["count"]
  # One batch of the whole split is one epoch: every record once.
  source = IndexedSource(str(data_dir), "train", global_batch_size=seen, seed=0,
                         image_size=16, max_title_len=12, process_index=0,
                         process_count=1)
  batch = next(source.batches(0))
  assert batch["valid"].all()
  kinds = lambda pairs: sorted((bool(t), bool(i)) for t, i in pairs)
  assert kinds(zip(batch["has_title"], batch["has_image"])) == kinds(
      (r["has_title"], r["has_image"]) for r in records.values() if r["split"] == "train")
  np.testing.assert_array_equal(batch["image"].any(axis=(1, 2, 3)), batch["has_image"])


def test_a_catalogue_without_images_is_refused_unless_asked_for(prepared, tmp_path):
  root, _, _ = prepared
  path = tmp_path / "titles.csv"
  _write_csv(path, ["item_id", "title", "product_id"],
             [(f"t{i}", f"steel kettle {i}", f"P{i // 2}") for i in range(6)])
  with pytest.raises(ValueError, match=r"no column 'image'.*--modalities any"):
    prepare.prepare(str(path), str(tmp_path), str(tmp_path / "refused"), num_workers=0)
  assert not (tmp_path / "refused").exists()
  info = prepare.prepare(str(path), str(tmp_path), str(tmp_path / "titles"),
                         num_workers=0, num_shards=1, modalities="any",
                         tokenizer_model=str(root / "out" / "tokenizer.model"))
  assert info["listings"] == {"title_and_image": 0, "title_only": 6, "image_only": 0}
  assert info["skipped"] == []


def test_reports_list_every_row_and_dataset_json_the_first(prepared_any, tmp_path,
                                                           monkeypatch):
  data_dir, info, _ = prepared_any
  # Every report row is in its file, in catalogue order.
  for name, count in (("skipped", info["num_skipped"]),
                      ("without_image", info["num_without_image"])):
    rows = list(prepare.report_rows(str(data_dir), name))
    assert rows == info[name] and len(rows) == count > 0
    assert [row["row"] for row in rows] == sorted(row["row"] for row in rows)
  assert info["num_skipped"] == sum(info["skipped_reasons"].values())
  # With a short list in dataset.json, the file still holds them all.
  monkeypatch.setattr(prepare, "REPORTED_ROWS", 2)
  root = data_dir.parent
  short = prepare.prepare(str(root / "catalogue.csv"), info["source"]["images"],
                          str(tmp_path / "short"), num_shards=2, num_workers=0,
                          tokenizer_model=str(data_dir / info["tokenizer"]),
                          max_image_side=MAX_SIDE, modalities="any")
  assert short["skipped"] == info["skipped"][:2]
  assert list(prepare.report_rows(str(tmp_path / "short"), "skipped")) == info["skipped"]
  assert short["skipped_reasons"] == info["skipped_reasons"]
  # A folder written before the report files: dataset.json's lists.
  old = json.loads((tmp_path / "short" / "dataset.json").read_text())
  del old["reports"]
  (tmp_path / "short" / "dataset.json").write_text(json.dumps(old))
  assert list(prepare.report_rows(str(tmp_path / "short"), "skipped")) == info["skipped"][:2]


def test_the_tokenizer_sample_is_a_bottom_k_by_hash_in_catalogue_order():
  from item_jax.data.tokenizer import TitleSample
  rows = [(row, f"item-{row}", f"title {row}") for row in range(2, 502)]
  whole = TitleSample(capacity=1000, seed=0)
  for row in rows:
    whole.add(*row)
  assert whole.titles() == [title for _, _, title in rows] and whole.seen == 500
  samples = []
  for order in (rows, rows[::-1], rows[250:] + rows[:250]):
    sample = TitleSample(capacity=50, seed=0)
    for row in order:
      sample.add(*row)
    samples.append(sample.titles())
  # The same 50 whatever the reading order: the smallest hashes, by row.
  assert samples[0] == samples[1] == samples[2] and len(samples[0]) == 50
  keys = sorted((TitleSample(seed=0).key(item), title) for _, item, title in rows)
  assert set(samples[0]) == {title for _, title in keys[:50]}
  assert samples[0] == sorted(samples[0], key=lambda title: int(title.split()[1]))
  other = TitleSample(capacity=50, seed=1)
  for row in rows:
    other.add(*row)
  assert other.titles() != samples[0]
