"""Checking catalogue images and turning them into the JPEG bytes a record stores.

Owns what "a usable image" means (fully decodable, not truncated) and the one
normal form: an upright RGB baseline JPEG whose larger side is at most a limit.
Runs in worker processes, so it imports neither TensorFlow nor JAX.
"""

import io

from etils import epath
from PIL import Image
from PIL import ImageOps

JPEG_QUALITY = 90
_EXIF_ORIENTATION = 0x0112

# Reasons an image is refused, as written to dataset.json.
MISSING_IMAGE = "missing image"
EMPTY_IMAGE = "empty image file"
UNDECODABLE_IMAGE = "undecodable image"
TRUNCATED_IMAGE = "truncated image"
OVERSIZED_IMAGE = "image too large to decode safely"


def read_and_encode(path: str | None, max_side: int) -> tuple[bytes | None, str | None, bool]:
  """Reads the image at `path` → `(jpeg, reason, reencoded)`.

  `jpeg` is None exactly when `reason` says why the image is refused. The
  source bytes are kept unchanged when they already are the normal form.
  A `path` of None (a row already skipped) gives `(None, None, False)`.
  """
  if path is None:
    return None, None, False
  try:
    source = epath.Path(path).read_bytes()
  except (FileNotFoundError, IsADirectoryError):
    return None, MISSING_IMAGE, False
  return encode_bytes(source, max_side)


def encode_bytes(source: bytes, max_side: int) -> tuple[bytes | None, str | None, bool]:
  """An image file's bytes → `(jpeg, reason, reencoded)`, as `read_and_encode`."""
  if not source:
    return None, EMPTY_IMAGE, False
  try:
    return _encode(source, max_side)
  except Image.DecompressionBombError:
    return None, OVERSIZED_IMAGE, False
  except Image.UnidentifiedImageError:
    return None, UNDECODABLE_IMAGE, False
  except Exception as error:  # Pillow's plugins raise many types on broken files.
    # Pillow reports a stream that ends early as "image file is truncated"
    # or "Truncated File Read"; anything else is a broken file.
    if "truncated" in str(error).lower():
      return None, TRUNCATED_IMAGE, False
    return None, UNDECODABLE_IMAGE, False


def encode_many(
    paths: list[str | None], max_side: int
) -> list[tuple[bytes | None, str | None, bool]]:
  """`read_and_encode` over a chunk of paths: one task per chunk keeps IPC cheap."""
  return [read_and_encode(path, max_side) for path in paths]


def to_rgb(image: Image.Image) -> Image.Image:
  """Upright RGB: EXIF rotation applied, transparency composited onto white."""
  image = ImageOps.exif_transpose(image)
  has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
  if has_alpha:
    # Product photos are shot on white; black under transparent pixels would
    # be a colour the listing never had.
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def _encode(source: bytes, max_side: int) -> tuple[bytes, None, bool]:
  image = Image.open(io.BytesIO(source))
  scale = min(1.0, max_side / max(image.size))
  target_size = tuple(max(1, round(side * scale)) for side in image.size)
  is_normal_form = (
      image.format == "JPEG"
      and image.mode == "RGB"
      and not image.info.get("progressive")
      and image.getexif().get(_EXIF_ORIENTATION, 1) == 1
      and scale == 1.0
  )
  if scale < 1.0:
    # JPEGs can be decoded straight at 1/2, 1/4 or 1/8 size, far faster than
    # decoding in full and shrinking afterwards.
    image.draft(None, target_size)
  # Decoding every pixel is the only reliable test for a truncated file.
  image.load()
  if is_normal_form:
    return source, None, False
  image = to_rgb(image)
  image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=None)
  jpeg = io.BytesIO()
  image.save(jpeg, "JPEG", quality=JPEG_QUALITY)
  return jpeg.getvalue(), None, True
