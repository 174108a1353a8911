"""Reading a user's catalogue (CSV or JSONL, local or gs://) into listings.

Owns the catalogue columns and their renaming, and the text-level checks that
decide whether a row is usable (the image checks live in `images`).
"""

from collections.abc import Container, Iterator
import csv
import dataclasses
import io
import itertools
import json

from etils import epath

from item_jax.errors import UserError

# "group": a family of products that must stay in one split, e.g. the
# colourways of one model (`prepare --split-by group`).
CATALOGUE_COLUMNS = ("item_id", "title", "image", "product_id", "category", "group")
REQUIRED_COLUMNS = ("item_id", "title", "image")
CATEGORY_SEPARATOR = " > "
# What a kept listing must have: "both" a title and an image (the paper's
# setting, the default); "any" a title, an image or both, so title-only and
# image-only listings are kept (and the image or title column may be absent).
MODALITIES = ("both", "any")
MODALITIES_SWITCH = "--modalities any"

# Reasons a row is skipped, as written to dataset.json.
NOT_UTF8 = "non-UTF-8 text"
MISSING_ITEM_ID = "missing item_id"
DUPLICATE_ITEM_ID = "duplicate item_id"
EMPTY_TITLE = "empty title"
MALFORMED_ROW = "malformed row"


@dataclasses.dataclass(frozen=True)
class Listing:
  """One catalogue row, with columns under their canonical names.

  `row` is the line of the catalogue file where the row starts (1-based; a CSV
  header is line 1). Absent optional fields are empty strings.
  """

  row: int
  item_id: str
  title: str
  image: str
  product_id: str = ""
  category: str = ""
  group: str = ""
  # The catalogue's other text columns that `prepare --text-columns` keeps
  # (e.g. a description), each non-empty value on its own line.
  text: str = ""


def parse_column_mapping(text: str) -> dict[str, str]:
  """Parses `item_id=posting_id,product_id=label_group` into a column mapping."""
  mapping = {}
  for entry in filter(None, (part.strip() for part in text.split(","))):
    canonical, separator, source = (side.strip() for side in entry.partition("="))
    if not separator or not canonical or not source:
      raise UserError(f"column mapping entry {entry!r} is not of the form name=column")
    if canonical not in CATALOGUE_COLUMNS:
      raise UserError(
          f"unknown catalogue column {canonical!r} in {text!r}; "
          f"known: {', '.join(CATALOGUE_COLUMNS)}"
      )
    mapping[canonical] = source
  return mapping


def resolve_columns(columns: dict[str, str] | None) -> dict[str, str]:
  """The full canonical → file column mapping: unnamed columns keep their names."""
  unknown = set(columns or {}) - set(CATALOGUE_COLUMNS)
  if unknown:
    raise UserError(f"unknown catalogue columns {sorted(unknown)}; known: {CATALOGUE_COLUMNS}")
  return {name: (columns or {}).get(name, name) for name in CATALOGUE_COLUMNS}


def normalise_category(category: str) -> str:
  """`"Home>Kitchen >  Knives"` → `"Home > Kitchen > Knives"`: one spelling per path."""
  levels = (level.strip() for level in category.split(">"))
  return CATEGORY_SEPARATOR.join(level for level in levels if level)


def read_catalogue(
    path: str, columns: dict[str, str] | None = None, require: tuple[str, ...] = (),
    modalities: str = "both", block: "Block | None" = None,
    duplicate_rows: Container[int] | None = None,
    text_columns: tuple[str, ...] = (),
) -> Iterator[tuple[Listing, str | None]]:
  """Yields every row as `(listing, reason)`, reason None when the text is usable.

  `columns` maps canonical names to the file's column names. A missing
  required (or explicitly mapped) column raises ValueError, naming the column
  and the file, when iteration starts, before any row. With `modalities`
  "any" (see MODALITIES) the title and image columns are optional, one of
  them must exist, and an empty title is no text problem (the caller keeps
  the row if its image is usable). The first row carrying an item id claims
  it; later rows with that id are duplicates even if the first is skipped
  for another reason.

  `block` (from `blocks`) reads only that block's rows. A reader that does
  not see the whole catalogue cannot find duplicates itself: it passes the
  rows that are (`duplicate_rows`, from `claims` over every row).
  `text_columns` (file column names, each required) fill `Listing.text`.
  """
  columns = resolve_columns(columns)
  expected, one_of = _expected_columns(columns, require, modalities)
  expected.update({f"text column {name}": name for name in text_columns})
  records = _records(path, expected, one_of, block)
  seen_item_ids = set()
  for row, record, _ in records:
    if record is None:
      yield Listing(row=row, item_id="", title="", image=""), MALFORMED_ROW
      continue
    fields = {name: _as_text(record.get(source)) for name, source in columns.items()}
    fields["category"] = normalise_category(fields["category"])
    fields["text"] = "\n".join(value for value in (
        _as_text(record.get(name)).strip() for name in text_columns) if value)
    listing = Listing(row=row, **fields)
    if duplicate_rows is None:
      duplicate = claims_item_id(listing) and listing.item_id in seen_item_ids
      if claims_item_id(listing):
        seen_item_ids.add(listing.item_id)
    else:
      duplicate = listing.row in duplicate_rows
    yield listing, text_problem(listing, duplicate, modalities == "both")


@dataclasses.dataclass(frozen=True)
class Block:
  """A run of consecutive catalogue rows that a reader can start at: the
  file position of its first record (`position`, as the text stream's
  tell() gives it), that record's line, and how many records it holds."""

  index: int
  position: int
  first_line: int
  num_records: int


def blocks(path: str, records_per_block: int, columns: dict[str, str] | None = None,
           require: tuple[str, ...] = (), modalities: str = "both",
           text_columns: tuple[str, ...] = ()) -> list[Block]:
  """The catalogue cut into blocks of `records_per_block` records, for readers
  that each read a part (`read_catalogue(..., block=)`). One pass over the
  file, keeping one entry per block; the columns are checked as
  `read_catalogue` checks them."""
  if records_per_block < 1:
    raise UserError(f"records_per_block must be at least 1, got {records_per_block}")
  starts, count = [], 0
  expected, one_of = _expected_columns(resolve_columns(columns), require, modalities)
  expected.update({f"text column {name}": name for name in text_columns})
  for row, _, position in _records(path, expected, one_of,
                                   positions_every=records_per_block):
    if count % records_per_block == 0:
      starts.append((position, row))
    count += 1
  return [Block(index, position, line,
                min(records_per_block, count - index * records_per_block))
          for index, (position, line) in enumerate(starts)]


def _expected_columns(columns: dict[str, str], require: tuple[str, ...], modalities: str
                      ) -> tuple[dict[str, str], tuple[str, ...]]:
  """The columns a file must have, and the pair of which it needs one."""
  if modalities not in MODALITIES:
    raise UserError(f"modalities must be one of {MODALITIES}, got {modalities!r}")
  optional = ("title", "image") if modalities == "any" else ()
  # Required columns must exist, and so must any the user named explicitly or
  # the caller needs (`require`).
  expected = {
      name: source for name, source in columns.items()
      if (name in REQUIRED_COLUMNS and name not in optional) or name in require
      or source != name
  }
  return expected, optional and (columns["title"], columns["image"])


def claims_item_id(listing: Listing) -> bool:
  """Whether the row claims its item id: later rows with that id are
  duplicates. Rows whose text is not UTF-8 or that have no id claim none."""
  return bool(listing.item_id.strip()) and not any(
      _has_undecodable_bytes(field) for field in _fields(listing))


def printable_item_id(item_id: str) -> str:
  """The item id with undecodable bytes shown as `\\xNN`, safe to write as JSON."""
  return item_id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def text_problem(listing: Listing, duplicate: bool,
                 title_required: bool = True) -> str | None:
  """Why the row's text is unusable (None: it is usable), given whether an
  earlier row claimed its item id (`claims_item_id`)."""
  if any(_has_undecodable_bytes(field) for field in _fields(listing)):
    return NOT_UTF8
  if not listing.item_id.strip():
    return MISSING_ITEM_ID
  if duplicate:
    return DUPLICATE_ITEM_ID
  if title_required and not listing.title.strip():
    return EMPTY_TITLE
  return None


def _fields(listing: Listing) -> tuple[str, ...]:
  return (listing.item_id, listing.title, listing.image, listing.product_id,
          listing.category, listing.group, listing.text)


def _has_undecodable_bytes(text: str) -> bool:
  # Files are decoded with "surrogateescape", so a byte that is not UTF-8
  # survives as a lone surrogate, which refuses to encode back.
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return True
  return False


def _as_text(value) -> str:
  if value is None:
    return ""
  if isinstance(value, list):  # JSONL may give a category as its levels.
    return CATEGORY_SEPARATOR.join(str(level) for level in value)
  return str(value)


def _open_text(path: str) -> io.TextIOWrapper:
  # Decoding leniently keeps one bad row from failing the whole file: the row
  # is skipped later with reason NOT_UTF8. "-sig" drops a spreadsheet's BOM.
  return io.TextIOWrapper(
      epath.Path(path).open("rb"), encoding="utf-8-sig", errors="surrogateescape", newline=""
  )


def _check_columns(path: str, found: list[str], expected: dict[str, str],
                   one_of: tuple[str, ...] = ()):
  for name, source in expected.items():
    if source not in found:
      renamed = f" (the {name} column)" if source != name else ""
      if name.startswith("text column"):
        renamed = " (named by --text-columns)"
      hint = ""
      if name in ("title", "image"):
        hint = (f"; `prepare {MODALITIES_SWITCH}` keeps listings with only "
                "a title or only an image and needs just one of the two columns")
      raise UserError(
          f"catalogue {path} has no column {source!r}{renamed}; its columns are "
          f"{found}{hint}"
      )
  if one_of and not set(one_of) & set(found):
    raise UserError(f"catalogue {path} has neither a title column {one_of[0]!r} "
                    f"nor an image column {one_of[1]!r}; its columns are {found}")


def _records(path: str, expected: dict[str, str], one_of: tuple[str, ...] = (),
             block: Block | None = None, positions_every: int | None = None
             ) -> Iterator[tuple[int, dict | None, int | None]]:
  """`(row, record, position)` for each record of the file (or of `block`):
  record None for a malformed one; position (where the record starts, for
  `blocks`) every `positions_every` records, else None."""
  suffix = epath.Path(path).suffix.lower()
  if suffix == ".csv":
    return _read_csv(path, expected, one_of, block, positions_every)
  if suffix in (".jsonl", ".ndjson"):
    return _read_jsonl(path, expected, one_of, block, positions_every)
  raise UserError(f"catalogue {path} must end in .csv or .jsonl")


def _read_csv(path: str, expected: dict[str, str], one_of: tuple[str, ...] = (),
              block: Block | None = None, positions_every: int | None = None
              ) -> Iterator[tuple[int, dict | None, int | None]]:
  # readline, not iteration, so that tell() gives where a record starts.
  with _open_text(path) as file:
    reader = csv.DictReader(iter(file.readline, ""))
    _check_columns(path, list(reader.fieldnames or []), expected, one_of)
    line_shift, limit = 0, None
    if block is not None:
      file.seek(block.position)
      line_shift = block.first_line - (reader.line_num + 1)
      limit = block.num_records
    for count in itertools.count():
      if count == limit:
        return
      position = file.tell() if positions_every and count % positions_every == 0 else None
      row_start = line_shift + reader.line_num + 1
      record = next(reader, None)
      if record is None:
        return
      yield row_start, record, position


def _read_jsonl(path: str, expected: dict[str, str], one_of: tuple[str, ...] = (),
                block: Block | None = None, positions_every: int | None = None
                ) -> Iterator[tuple[int, dict | None, int | None]]:
  # JSONL has no header: the first record shows which columns the file has
  # (a block's reader relies on the whole file's check); a later record
  # lacking a required key is skipped by the usual checks.
  checked = block is not None
  with _open_text(path) as file:
    line_number, count = 0, 0
    if block is not None:
      file.seek(block.position)
      line_number = block.first_line - 1
    while block is None or count < block.num_records:
      position = file.tell() if positions_every and count % positions_every == 0 else None
      line = file.readline()
      if not line:
        return
      line_number += 1
      if not line.strip():
        continue
      count += 1
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if not isinstance(record, dict):
        yield line_number, None, position
        continue
      if not checked:
        _check_columns(path, list(record), expected, one_of)
        checked = True
      yield line_number, record, position
