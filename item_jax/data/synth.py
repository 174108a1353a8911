"""The synthetic product catalogue, the embedded default data set: a category tree,
products in sibling groups, sellers' reworded listing titles, and the writer of
catalogue.csv + images/ (the photos themselves are drawn by synth_images)."""

import collections
import csv
import dataclasses
import math
import multiprocessing
import os
import pathlib

import numpy as np

from item_jax.data import synth_images
from item_jax.errors import UserError

# Leaves of the category tree: path, object shape, the shape's usual width/height,
# the sellers' nouns for the thing (synonyms), descriptors a product may carry.
# No noun or descriptor may be a colour or pattern word: for image-decisive
# products the title must not leak what only the photo should show.
_LEAF_TABLE = (
    ("Home > Kitchen > Mugs", "mug", 1.1,
     "mug|cup|coffee mug|tea cup", "ceramic|350ml|dishwasher safe|large"),
    ("Home > Kitchen > Plates", "ellipse", 1.0,
     "plate|dinner plate|dish", "porcelain|27cm|set of 4|microwave safe"),
    ("Home > Kitchen > Kettles", "kettle", 1.0,
     "kettle|electric kettle|water boiler", "1.7l|stainless steel|cordless|fast boil"),
    ("Home > Decor > Vases", "vase", 0.7,
     "vase|flower vase|pot", "glass|ceramic|tall|handmade"),
    ("Home > Decor > Cushions", "rounded_rect", 1.0,
     "cushion|throw pillow|cushion cover", "45x45cm|velvet|soft|zip"),
    ("Home > Decor > Mirrors", "hexagon", 1.1,
     "mirror|wall mirror|vanity mirror", "framed|50cm|bathroom"),
    ("Home > Bedding > Blankets", "rectangle", 1.4,
     "blanket|throw|fleece blanket", "fleece|king size|warm|150x200"),
    ("Home > Bedding > Pillows", "rounded_rect", 1.7,
     "pillow|bed pillow|sleeping pillow", "memory foam|queen|hypoallergenic"),
    ("Fashion > Bags > Backpacks", "backpack", 0.8,
     "backpack|rucksack|school bag", "waterproof|20l|laptop|travel"),
    ("Fashion > Bags > Tote Bags", "tote", 1.0,
     "tote bag|shopping bag|tote", "canvas|reusable|large"),
    ("Fashion > Accessories > Sunglasses", "glasses", 2.2,
     "sunglasses|shades|sun glasses", "polarized|uv400|unisex"),
    ("Fashion > Accessories > Watches", "watch", 0.6,
     "watch|wristwatch|wrist watch", "quartz|waterproof|mens|womens"),
    ("Fashion > Headwear > Caps", "dome", 1.3,
     "cap|baseball cap|hat", "adjustable|cotton|snapback"),
    ("Fashion > Footwear > Sneakers", "shoe", 1.8,
     "sneakers|trainers|running shoes", "size 42|breathable|lace up"),
    ("Electronics > Audio > Headphones", "headphones", 1.0,
     "headphones|headset|over ear headphones", "wireless|bluetooth|noise cancelling|foldable"),
    ("Electronics > Audio > Speakers", "cylinder", 0.6,
     "speaker|bluetooth speaker|portable speaker", "waterproof|10w|bass"),
    ("Electronics > Phone Accessories > Phone Cases", "rounded_rect", 0.5,
     "phone case|phone cover|case", "for iphone 15|shockproof|slim|silicone"),
    ("Electronics > Phone Accessories > Power Banks", "rounded_rect", 0.6,
     "power bank|portable charger|battery pack", "10000mah|usb c|fast charging"),
    ("Toys > Outdoor > Kites", "diamond", 0.8,
     "kite|beach kite|flying kite", "easy fly|nylon|kids"),
    ("Toys > Outdoor > Balls", "ellipse", 1.0,
     "ball|football|play ball", "size 5|rubber|inflatable"),
    ("Toys > Plush > Star Plushies", "star", 1.0,
     "star plush|plush toy|stuffed star", "soft|30cm|for kids"),
    ("Sports > Fitness > Yoga Mats", "capsule", 2.5,
     "yoga mat|exercise mat|fitness mat", "non slip|6mm|tpe"),
    ("Sports > Fitness > Water Bottles", "bottle", 0.45,
     "water bottle|bottle|sports bottle", "bpa free|750ml|leakproof"),
    ("Sports > Camping > Tents", "triangle", 1.4,
     "tent|camping tent|dome tent", "2 person|waterproof|pop up"),
    ("Office > Stationery > Notebooks", "rectangle", 0.72,
     "notebook|journal|notepad", "a5|lined|hardcover|200 pages"),
    ("Office > Stationery > Pencil Cases", "capsule", 2.2,
     "pencil case|pen pouch|pencil pouch", "zipper|large capacity"),
    ("Office > Desk > Desk Lamps", "lamp", 0.8,
     "desk lamp|table lamp|reading lamp", "led|dimmable|usb"),
)
# Colour name, RGB, the words sellers use for it.
_COLOUR_TABLE = (
    ("red", (200, 30, 40), "red|scarlet|crimson"),
    ("orange", (240, 130, 20), "orange|tangerine"),
    ("yellow", (240, 210, 40), "yellow|lemon|mustard"),
    ("green", (40, 150, 60), "green|emerald|forest green"),
    ("teal", (20, 140, 140), "teal|turquoise|aqua"),
    ("blue", (30, 80, 200), "blue|royal blue|cobalt"),
    ("navy", (20, 30, 90), "navy|navy blue|dark blue"),
    ("purple", (120, 50, 160), "purple|violet|plum"),
    ("pink", (240, 120, 170), "pink|rose|blush"),
    ("brown", (120, 70, 30), "brown|chocolate|walnut"),
    ("black", (25, 25, 25), "black|jet black|ebony"),
    ("white", (245, 245, 240), "white|ivory|snow white"),
    ("grey", (128, 128, 128), "grey|gray|slate"),
    ("beige", (215, 195, 150), "beige|tan|khaki"),
)
# "" lets a solid product's title simply say nothing about its pattern.
PATTERN_WORDS = {
    "solid": ("", "solid", "plain"),
    "striped": ("striped", "stripe", "stripy"),
    "dotted": ("dotted", "polka dot", "spotted"),
    "checked": ("checked", "plaid", "checkered"),
    "zigzag": ("zigzag", "chevron"),
}
NOISE_PHRASES = (
    "new", "brand new", "free shipping", "hot sale", "2024", "best price", "fast delivery",
    "original", "high quality", "gift idea", "limited offer", "sale",
)
# What an image-decisive title may say instead of its colour or pattern.
BLUR_PHRASES = ("assorted colours", "multi colour", "various patterns", "colour as shown", "many styles")
BRANDS = (
    "Kovo", "Arlen", "Zentra", "Mirabo", "Quilo", "Tessa", "Brixo", "Nordvik", "Palmo", "Ostra",
    "Velura", "Corvin", "Lumo", "Skandi", "Fenwick", "Aurex", "Dorian", "Hallet", "Ivaro", "Jupon",
)
_CODE_LETTERS = "ABCDEFGHJKLMNPRSTVXZ"


@dataclasses.dataclass(frozen=True)
class Leaf:
  path: tuple[str, ...]
  shape: str
  aspect: float
  nouns: tuple[str, ...]
  descriptors: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Colour:
  name: str
  rgb: tuple[int, int, int]
  words: tuple[str, ...]


LEAVES = tuple(
    Leaf(tuple(path.split(" > ")), shape, aspect, tuple(nouns.split("|")), tuple(descriptors.split("|")))
    for path, shape, aspect, nouns, descriptors in _LEAF_TABLE
)
COLOURS = tuple(Colour(name, rgb, tuple(words.split("|"))) for name, rgb, words in _COLOUR_TABLE)

# Sibling groups make the catalogue a fair test that neither modality may dominate.
# "single": a product with no look-alike sibling. "image_decisive": siblings share
# brand, model code and shape, titles never say colour or pattern, so only the
# photo tells them apart. "title_decisive": siblings look exactly alike and differ
# only in their model code, which every title carries.
SINGLE, IMAGE_DECISIVE, TITLE_DECISIVE = "single", "image_decisive", "title_decisive"
# Groups take kinds in this rotation; by default decisive groups hold 2-3
# products (each size equally likely), so about 2/7 of products are singles and
# 5/14 fall in each decisive kind. Larger groups (`group_sizes`) make a harder
# catalogue: more siblings that only the photo, or only the code, tells apart.
GROUP_KIND_CYCLE = (SINGLE, IMAGE_DECISIVE, SINGLE, TITLE_DECISIVE)
GROUP_SIZES = (2, 3)
LISTINGS_PER_PRODUCT = (2, 6)  # inclusive range
# Random streams: a group's products from [seed, _GROUP_STREAM, group_index], a
# product's listings from [seed, _LISTING_STREAM, product_index], so any process
# can render any product alone and get the same bytes.
_GROUP_STREAM, _LISTING_STREAM = 1, 2


@dataclasses.dataclass(frozen=True)
class Product:
  """A product as its maker defines it; its listings are sellers' takes on it."""
  index: int
  product_id: str
  group_index: int
  group_kind: str
  leaf: Leaf
  brand: str
  model_code: str
  colour: Colour
  pattern: str
  descriptors: tuple[str, ...]
  look: synth_images.ObjectLook
  num_listings: int
  first_listing_index: int

  @property
  def title_shows_look(self) -> bool:
    return self.group_kind != IMAGE_DECISIVE


def _pick(rng: np.random.Generator, choices):
  return choices[rng.integers(len(choices))]


def _model_codes(rng: np.random.Generator, count: int) -> list[str]:
  """Distinct codes of one product line, e.g. KX-204, KX-208."""
  prefix = "".join(_pick(rng, _CODE_LETTERS) for _ in range(2))
  numbers = np.sort(rng.choice(np.arange(100, 1000), size=count, replace=False))
  return [f"{prefix}-{number}" for number in numbers]


def _look(rng: np.random.Generator, leaf: Leaf, colour: Colour, pattern: str) -> synth_images.ObjectLook:
  return synth_images.ObjectLook(
      shape=leaf.shape,
      aspect=leaf.aspect * float(rng.uniform(0.85, 1.18)),
      fill=float(rng.uniform(0.55, 0.72)),
      colour=colour.rgb,
      pattern=pattern,
      pattern_angle=float(_pick(rng, (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4))),
      pattern_period=float(rng.uniform(0.18, 0.32)),
  )


def _group_products(rng: np.random.Generator, group_kind: str,
                    group_sizes: tuple[int, ...] = GROUP_SIZES) -> list[dict]:
  """Fields of one group's products; siblings share what their kind says they share."""
  size = 1 if group_kind == SINGLE else int(_pick(rng, group_sizes))
  leaf = _pick(rng, LEAVES)
  brand = _pick(rng, BRANDS)
  descriptor_indices = rng.choice(len(leaf.descriptors), size=int(rng.integers(1, 3)), replace=False)
  descriptors = tuple(leaf.descriptors[i] for i in sorted(descriptor_indices))
  colours = [COLOURS[i] for i in rng.choice(len(COLOURS), size=size, replace=False)]
  patterns = [_pick(rng, synth_images.PATTERNS) for _ in range(size)]
  codes = _model_codes(rng, size)
  if group_kind == IMAGE_DECISIVE:
    # One model in several colourways: the same code and the same body.
    codes = [codes[0]] * size
    body = _look(rng, leaf, colours[0], patterns[0])
    looks = [dataclasses.replace(body, colour=colour.rgb, pattern=pattern)
             for colour, pattern in zip(colours, patterns)]
  elif group_kind == TITLE_DECISIVE:
    colours, patterns = [colours[0]] * size, [patterns[0]] * size
    looks = [_look(rng, leaf, colours[0], patterns[0])] * size
  else:
    looks = [_look(rng, leaf, colours[0], patterns[0])]
  low, high = LISTINGS_PER_PRODUCT
  return [
      dict(group_kind=group_kind, leaf=leaf, brand=brand, model_code=code, colour=colour, pattern=pattern,
           descriptors=descriptors, look=look, num_listings=int(rng.integers(low, high + 1)))
      for code, colour, pattern, look in zip(codes, colours, patterns, looks)
  ]


def check_group_sizes(group_sizes) -> tuple[int, ...]:
  """The sizes a decisive group may take, as a tuple; each sibling needs its own colour."""
  sizes = tuple(group_sizes)
  if not sizes or any(isinstance(size, bool) or not isinstance(size, (int, np.integer))
                      or not 2 <= size <= len(COLOURS) for size in sizes):
    raise UserError(f"group_sizes must be integers from 2 to {len(COLOURS)} (one colour "
                    f"per sibling), got {group_sizes!r}")
  return tuple(int(size) for size in sizes)


def parse_group_sizes(text: str) -> tuple[int, ...]:
  """'5-8' -> (5, 6, 7, 8); '2,3' -> (2, 3)."""
  try:
    if "-" in text:
      low, high = (int(part) for part in text.split("-"))
      sizes = tuple(range(low, high + 1))
    else:
      sizes = tuple(int(part) for part in text.split(","))
    return check_group_sizes(sizes)
  except ValueError as error:
    raise UserError(f"group sizes {text!r}: expected MIN-MAX or a comma list of "
                    f"integers from 2 to {len(COLOURS)} ({error})") from None


def build_products(num_products: int, seed: int,
                   group_sizes: tuple[int, ...] = GROUP_SIZES) -> list[Product]:
  """The catalogue's products, without titles or photos: cheap, so every caller
  (the writer, tests, evaluation of the hard groups) can rebuild it."""
  products: list[Product] = []
  group_index = 0
  listing_count = 0
  while len(products) < num_products:
    rng = np.random.default_rng([seed, _GROUP_STREAM, group_index])
    group_kind = GROUP_KIND_CYCLE[group_index % len(GROUP_KIND_CYCLE)]
    for fields in _group_products(rng, group_kind, group_sizes)[: num_products - len(products)]:
      index = len(products)
      products.append(Product(index=index, product_id=f"P{index:06d}", group_index=group_index,
                              first_listing_index=listing_count, **fields))
      listing_count += fields["num_listings"]
    group_index += 1
  return products


def _title_segments(product: Product, rng: np.random.Generator) -> tuple[list[str], list[str], str]:
  """One seller's choice of words: (brand and code, attributes, noun); dropped
  attributes are left out and synonyms picked."""
  head = []
  if rng.random() < 0.9:
    head.append(product.brand)
  # Title-decisive siblings are told apart by their code alone, so it always stays.
  if product.group_kind == TITLE_DECISIVE or rng.random() < 0.85:
    head.append(product.model_code)
  attributes = []
  if product.title_shows_look:
    if rng.random() < 0.8:
      attributes.append(_pick(rng, product.colour.words))
    if rng.random() < 0.7:
      attributes.append(_pick(rng, PATTERN_WORDS[product.pattern]))
  elif rng.random() < 0.3:
    attributes.append(_pick(rng, BLUR_PHRASES))
  attributes += [descriptor for descriptor in product.descriptors if rng.random() < 0.6]
  return head, [word for word in attributes if word], _pick(rng, product.leaf.nouns)


def _typo(rng: np.random.Generator, words: list[str]) -> list[str]:
  """Swaps two neighbouring letters or drops one, in one plain word (never a code)."""
  candidates = [i for i, word in enumerate(words) if word.isalpha() and len(word) >= 4]
  if not candidates:
    return words
  position = candidates[rng.integers(len(candidates))]
  word = words[position]
  letter = int(rng.integers(len(word) - 1))
  if rng.random() < 0.5:
    word = word[:letter] + word[letter + 1] + word[letter] + word[letter + 2:]
  else:
    word = word[:letter] + word[letter + 1:]
  return words[:position] + [word] + words[position + 1:]


def reword_title(product: Product, rng: np.random.Generator) -> str:
  """A seller's title for the product: synonyms, own word order, dropped
  attributes, noise phrases, sometimes a typo or all capitals."""
  head, attributes, noun = _title_segments(product, rng)
  if rng.random() < 0.5:
    attributes = [attributes[i] for i in rng.permutation(len(attributes))]
  layout = rng.integers(3)
  if layout == 0:
    segments = head + attributes + [noun]
  elif layout == 1:
    segments = [noun] + head + attributes
  else:
    segments = attributes + [noun] + head
  for phrase_index in rng.choice(len(NOISE_PHRASES), size=int(rng.integers(0, 3)), replace=False):
    phrase = NOISE_PHRASES[phrase_index]
    segments = [phrase] + segments if rng.random() < 0.5 else segments + [phrase]
  words = " ".join(segments).split(" ")
  if rng.random() < 0.2:
    words = _typo(rng, words)
  title = " ".join(words)
  return title.upper() if rng.random() < 0.1 else title


def _listing_rows(products: list[Product], seed: int, image_size: int, images_dir: str) -> list[list[str]]:
  """Writes the products' listing photos and returns their catalogue rows; runs in
  a worker process."""
  rows = []
  for product in products:
    rng = np.random.default_rng([seed, _LISTING_STREAM, product.index])
    for listing in range(product.num_listings):
      item_id = f"{product.first_listing_index + listing:06d}"
      title = reword_title(product, rng)
      view = synth_images.random_view(rng)
      pixels = synth_images.render_pixels(product.look, view, image_size, rng)
      image = f"{item_id}.jpg"
      pathlib.Path(images_dir, image).write_bytes(synth_images.jpeg_bytes(pixels, view.jpeg_quality))
      rows.append([item_id, title, image, product.product_id, " > ".join(product.leaf.path),
                   f"G{product.group_index:06d}"])
  return rows


def _check_int(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def synthesize(output_dir: str, num_products: int, seed: int = 0, image_size: int = 128,
               num_workers: int | None = None,
               group_sizes: tuple[int, ...] = GROUP_SIZES) -> dict:
  """Writes OUTPUT/catalogue.csv (item_id,title,image,product_id,category,group:
  the sibling group) and
  OUTPUT/images/*.jpg; the same (num_products, seed, image_size, group_sizes)
  give the same bytes whatever num_workers. Returns a summary of what was
  written. `group_sizes`: the sizes a decisive sibling group may take.

  More than one worker means spawned processes, so a calling script needs the
  `if __name__ == "__main__":` guard."""
  _check_int("num_products", num_products, 1)
  _check_int("seed", seed, 0)
  _check_int("image_size", image_size, 32)
  if num_workers is not None:
    _check_int("num_workers", num_workers, 1)
  group_sizes = check_group_sizes(group_sizes)
  products = build_products(num_products, seed, group_sizes)
  images_dir = os.path.join(output_dir, "images")
  os.makedirs(images_dir, exist_ok=True)
  processes = min(num_workers or os.cpu_count() or 1, num_products)
  # A few chunks per process keep the processes busy until the end.
  chunk_size = math.ceil(num_products / (processes * 4))
  chunks = [(products[start:start + chunk_size], seed, image_size, images_dir)
            for start in range(0, num_products, chunk_size)]
  if processes == 1:
    chunk_rows = [_listing_rows(*chunk) for chunk in chunks]
  else:
    # spawn, not fork: the caller may already run JAX or TensorFlow threads.
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
      chunk_rows = pool.starmap(_listing_rows, chunks)
  catalogue_path = os.path.join(output_dir, "catalogue.csv")
  with open(catalogue_path, "w", newline="", encoding="utf-8") as catalogue_file:
    writer = csv.writer(catalogue_file, lineterminator="\n")
    writer.writerow(["item_id", "title", "image", "product_id", "category", "group"])
    for rows in chunk_rows:
      writer.writerows(rows)
  return {
      "num_products": num_products,
      "num_listings": sum(product.num_listings for product in products),
      "num_categories": len({product.leaf.path for product in products}),
      "products_per_kind": dict(collections.Counter(product.group_kind for product in products)),
      "group_sizes": list(group_sizes),
      "paths": {"catalogue": catalogue_path, "images": images_dir},
  }
