"""Tests of the synthetic catalogue: its file layout, determinism, the sellers'
rewording of titles, and the two kinds of hard sibling groups."""

import collections
import csv
import itertools
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from item_jax.data import synth
from item_jax.data import synth_images

NUM_PRODUCTS = 30
IMAGE_SIZE = 64
COLOUR_VOCABULARY = {word for colour in synth.COLOURS for phrase in colour.words for word in phrase.split()}
PATTERN_VOCABULARY = {
    word for phrases in synth.PATTERN_WORDS.values() for phrase in phrases for word in phrase.split()}
LOOK_VOCABULARY = COLOUR_VOCABULARY | PATTERN_VOCABULARY


def _read_rows(catalogue_path: str) -> list[dict]:
  with open(catalogue_path, newline="", encoding="utf-8") as catalogue_file:
    return list(csv.DictReader(catalogue_file))


def _normalised_words(title: str) -> list[str]:
  """The title's words in lower case, without noise or blur phrases."""
  text = title.lower()
  for phrase in sorted(synth.NOISE_PHRASES + synth.BLUR_PHRASES, key=len, reverse=True):
    text = re.sub(rf"\b{re.escape(phrase)}\b", " ", text)
  return text.split()


def _base_render(product: synth.Product) -> np.ndarray:
  return synth_images.render_pixels(product.look, synth_images.BASE_VIEW, IMAGE_SIZE).astype(np.float32)


def _sibling_groups(products: list[synth.Product], group_kind: str) -> list[list[synth.Product]]:
  groups = collections.defaultdict(list)
  for product in products:
    if product.group_kind == group_kind:
      groups[product.group_index].append(product)
  return [group for group in groups.values() if len(group) >= 2]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
  output_dir = tmp_path_factory.mktemp("catalogue")
  summary = synth.synthesize(str(output_dir), NUM_PRODUCTS, seed=3, image_size=IMAGE_SIZE, num_workers=1)
  return summary, _read_rows(summary["paths"]["catalogue"])


def test_same_seed_gives_same_bytes_whatever_the_worker_count(tmp_path):
  def run(name: str, seed: int, num_workers: int) -> dict:
    return synth.synthesize(str(tmp_path / name), NUM_PRODUCTS, seed, IMAGE_SIZE, num_workers)

  one_process, two_processes, other_seed = run("a", 0, 1), run("b", 0, 2), run("c", 1, 1)

  def files(summary: dict) -> dict[str, bytes]:
    images_dir = pathlib.Path(summary["paths"]["images"])
    images = {path.name: path.read_bytes() for path in images_dir.iterdir()}
    return {"catalogue.csv": pathlib.Path(summary["paths"]["catalogue"]).read_bytes(), **images}

  assert files(one_process) == files(two_processes)
  assert files(one_process)["catalogue.csv"] != files(other_seed)["catalogue.csv"]
  assert files(one_process)["000000.jpg"] != files(other_seed)["000000.jpg"]


def test_layout_is_a_user_catalogue(catalogue):
  summary, rows = catalogue
  header = pathlib.Path(summary["paths"]["catalogue"]).read_text(encoding="utf-8").splitlines()[0]
  assert header == "item_id,title,image,product_id,category,group"
  assert len(rows) == summary["num_listings"]
  assert len({row["item_id"] for row in rows}) == len(rows)
  for row in rows:
    with Image.open(pathlib.Path(summary["paths"]["images"], row["image"])) as image:
      assert image.format == "JPEG"
      assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
      image.load()
    assert len(row["category"].split(" > ")) >= 3
  listings_per_product = collections.Counter(row["product_id"] for row in rows)
  assert len(listings_per_product) == summary["num_products"] == NUM_PRODUCTS
  assert all(2 <= count <= 6 for count in listings_per_product.values())
  assert summary["num_categories"] == len({row["category"] for row in rows})
  assert set(summary["products_per_kind"]) == {synth.SINGLE, synth.IMAGE_DECISIVE, synth.TITLE_DECISIVE}


def test_category_tree_is_deep_and_wide():
  assert all(len(leaf.path) >= 3 for leaf in synth.LEAVES)
  assert len({leaf.path for leaf in synth.LEAVES}) >= 20
  assert all(leaf.shape in synth_images.SHAPES for leaf in synth.LEAVES)


def test_product_words_never_name_a_colour_or_pattern():
  # Image-decisive titles draw on these words: a colour among them would leak the photo.
  phrases = [phrase for leaf in synth.LEAVES for phrase in leaf.nouns + leaf.descriptors]
  phrases += list(synth.BRANDS) + list(synth.BLUR_PHRASES) + list(synth.NOISE_PHRASES)
  words = {word for phrase in phrases for word in phrase.lower().split()}
  assert not words & LOOK_VOCABULARY


@pytest.mark.parametrize("shape", sorted(synth_images.SHAPES))
def test_every_shape_and_pattern_draws_an_object(shape):
  for pattern in synth_images.PATTERNS:
    look = synth_images.ObjectLook(shape, 1.0, 0.6, (200, 30, 40), pattern, 0.0, 0.25)
    pixels = synth_images.render_pixels(look, synth_images.BASE_VIEW, IMAGE_SIZE)
    object_share = np.mean(np.any(pixels < 230, axis=-1))
    assert 0.05 < object_share < 0.6, (shape, pattern, object_share)


def test_listing_photos_vary_pose_background_and_lighting():
  rng = np.random.default_rng(0)
  views = [synth_images.random_view(rng) for _ in range(20)]
  assert len({view.angle for view in views}) == 20
  assert len({view.background for view in views}) == 20
  assert len({view.background_texture for view in views}) == len(synth_images.BACKGROUND_TEXTURES)
  assert len({view.jpeg_quality for view in views}) > 5


def test_sellers_reword_titles(catalogue):
  _, rows = catalogue
  titles_per_product = collections.defaultdict(set)
  for row in rows:
    titles_per_product[row["product_id"]].add(row["title"])
  reworded = sum(len(titles) > 1 for titles in titles_per_product.values())
  assert reworded >= 0.8 * len(titles_per_product)
  noisy = sum(any(phrase in row["title"].lower() for phrase in synth.NOISE_PHRASES) for row in rows)
  assert noisy > 0


def test_image_decisive_siblings_differ_only_in_the_photo(catalogue):
  products = synth.build_products(60, seed=0)
  groups = _sibling_groups(products, synth.IMAGE_DECISIVE)
  assert len(groups) >= 3
  for group in groups:
    # Every input of their titles is shared, so the titles come from one distribution.
    assert len({(p.brand, p.model_code, p.leaf, p.descriptors) for p in group}) == 1
    assert len({p.colour.name for p in group}) == len(group)
    for first, second in itertools.combinations(group, 2):
      assert np.mean(np.abs(_base_render(first) - _base_render(second))) > 5

  _, rows = catalogue
  catalogue_products = {p.product_id: p for p in synth.build_products(NUM_PRODUCTS, seed=3)}
  titles = collections.defaultdict(list)
  for row in rows:
    product = catalogue_products[row["product_id"]]
    if product.group_kind == synth.IMAGE_DECISIVE:
      assert not set(_normalised_words(row["title"])) & LOOK_VOCABULARY, row["title"]
      titles[product.group_index, product.product_id].append(sorted(_normalised_words(row["title"])))
  same_title_pairs = sum(
      first_title == second_title
      for (first, first_titles), (second, second_titles) in itertools.combinations(titles.items(), 2)
      if first[0] == second[0]
      for first_title, second_title in itertools.product(first_titles, second_titles))
  assert same_title_pairs > 0


def test_title_decisive_siblings_differ_only_in_the_model_code(catalogue):
  products = synth.build_products(60, seed=0)
  groups = _sibling_groups(products, synth.TITLE_DECISIVE)
  assert len(groups) >= 3
  for group in groups:
    assert len({p.model_code for p in group}) == len(group)
    for first, second in itertools.combinations(group, 2):
      assert np.mean(np.abs(_base_render(first) - _base_render(second))) < 1

  _, rows = catalogue
  catalogue_products = {p.product_id: p for p in synth.build_products(NUM_PRODUCTS, seed=3)}
  for row in rows:
    product = catalogue_products[row["product_id"]]
    if product.group_kind == synth.TITLE_DECISIVE:
      assert product.model_code in row["title"]


@pytest.mark.parametrize("argument, value", [
    ("num_products", 0), ("num_products", 2.5), ("num_products", True), ("seed", -1),
    ("image_size", 8), ("num_workers", 0),
])
def test_bad_arguments_are_refused(tmp_path, argument, value):
  arguments = dict(output_dir=str(tmp_path), num_products=2, seed=0, image_size=IMAGE_SIZE, num_workers=1)
  arguments[argument] = value
  with pytest.raises(ValueError, match=argument):
    synth.synthesize(**arguments)


def test_group_sizes_set_how_many_siblings_a_decisive_group_holds():
  default = synth.build_products(120, seed=0)
  larger = synth.build_products(120, seed=0, group_sizes=(5, 6, 7, 8))
  for products, sizes in ((default, {2, 3}), (larger, {5, 6, 7, 8})):
    # The last group may be cut short by num_products.
    last_group = products[-1].group_index
    for kind in (synth.IMAGE_DECISIVE, synth.TITLE_DECISIVE):
      groups = [group for group in _sibling_groups(products, kind)
                if group[0].group_index != last_group]
      assert groups and {len(group) for group in groups} <= sizes
      assert len({len(group) for group in groups}) >= 2
  for group in _sibling_groups(larger, synth.IMAGE_DECISIVE):
    # Still one model in as many colourways: only the photo tells them apart.
    assert len({p.colour.name for p in group}) == len(group)
    assert len({(p.brand, p.model_code, p.descriptors) for p in group}) == 1
  # The default is what group_sizes=(2, 3) draws, product for product.
  assert default == synth.build_products(120, seed=0, group_sizes=(2, 3))


@pytest.mark.parametrize("text, sizes", [("5-8", (5, 6, 7, 8)), ("2,3", (2, 3)),
                                         ("4", (4,))])
def test_group_sizes_parse_from_a_range_or_a_list(text, sizes):
  assert synth.parse_group_sizes(text) == sizes


@pytest.mark.parametrize("text", ["1-3", "2-15", "x", "5-", ""])
def test_bad_group_sizes_are_refused_with_the_text_named(text):
  with pytest.raises(ValueError, match=f"group sizes '{text}'"):
    synth.parse_group_sizes(text)
  with pytest.raises(ValueError, match="group_sizes"):
    synth.synthesize("/nonexistent/never-written", 3, group_sizes=(1, 2))
