"""Renders the synthetic catalogue's listing photos: a product's object (shape,
colour, pattern) drawn with PIL under one listing's pose, scale, background,
lighting and JPEG quality. Knows nothing about titles or the category tree."""

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

# Shapes as parts in a unit box (x right, y down), stretched to the object's box:
#   ("polygon", points), ("ellipse", box), ("rect", box),
#   ("rounded", box, radius as a share of the box's shorter side),
#   ("arc", box, start degrees, end degrees, width as a share of the shorter side).
_STAR_POINTS = tuple(
    (0.5 + radius * np.sin(angle) / 2, 0.5 - radius * np.cos(angle) / 2)
    for angle, radius in zip(np.linspace(0, 2 * np.pi, 10, endpoint=False), [1.0, 0.45] * 5)
)
SHAPES = {
    "rectangle": [("rect", (0, 0, 1, 1))],
    "ellipse": [("ellipse", (0, 0, 1, 1))],
    "rounded_rect": [("rounded", (0, 0, 1, 1), 0.2)],
    "capsule": [("rounded", (0, 0, 1, 1), 0.5)],
    "diamond": [("polygon", ((0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)))],
    "triangle": [("polygon", ((0.5, 0), (1, 1), (0, 1)))],
    "hexagon": [
        ("polygon", ((0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5))),
    ],
    "star": [("polygon", _STAR_POINTS)],
    "mug": [("rect", (0, 0.05, 0.75, 1)), ("arc", (0.5, 0.25, 1, 0.8), 0, 360, 0.12)],
    "kettle": [
        ("ellipse", (0.1, 0.25, 0.85, 1)),
        ("polygon", ((0.75, 0.5), (1, 0.3), (1, 0.42), (0.82, 0.8))),
        ("arc", (0.2, 0.02, 0.75, 0.55), 180, 360, 0.08),
    ],
    "vase": [
        ("polygon", ((0.35, 0), (0.65, 0), (0.6, 0.15), (1, 0.55), (0.8, 1), (0.2, 1), (0, 0.55), (0.4, 0.15))),
    ],
    "bottle": [
        ("rect", (0.36, 0, 0.64, 0.14)),
        ("polygon", ((0.36, 0.12), (0.64, 0.12), (0.92, 0.3), (0.92, 1), (0.08, 1), (0.08, 0.3))),
    ],
    "tote": [
        ("polygon", ((0.1, 0.35), (0.9, 0.35), (1, 1), (0, 1))),
        ("arc", (0.25, 0, 0.75, 0.6), 180, 360, 0.08),
    ],
    "backpack": [("rounded", (0.05, 0.18, 0.95, 1), 0.3), ("arc", (0.3, 0, 0.7, 0.36), 180, 360, 0.09)],
    "glasses": [
        ("ellipse", (0, 0.15, 0.43, 0.85)),
        ("ellipse", (0.57, 0.15, 1, 0.85)),
        ("rect", (0.4, 0.35, 0.6, 0.47)),
    ],
    "watch": [("rect", (0.3, 0, 0.7, 1)), ("ellipse", (0.05, 0.22, 0.95, 0.78))],
    "dome": [("pieslice", (0.05, 0.05, 0.85, 1.65), 180, 360), ("rect", (0.05, 0.84, 1, 1))],
    "shoe": [("polygon", ((0, 0.3), (0.35, 0.3), (0.5, 0.52), (0.92, 0.66), (1, 1), (0, 1)))],
    "headphones": [
        ("arc", (0.08, 0, 0.92, 0.9), 180, 360, 0.1),
        ("rounded", (0, 0.42, 0.24, 1), 0.4),
        ("rounded", (0.76, 0.42, 1, 1), 0.4),
    ],
    "cylinder": [("rect", (0, 0.1, 1, 0.9)), ("ellipse", (0, 0, 1, 0.2)), ("ellipse", (0, 0.8, 1, 1))],
    "lamp": [
        ("polygon", ((0.22, 0), (0.78, 0), (1, 0.45), (0, 0.45))),
        ("rect", (0.45, 0.45, 0.55, 0.9)),
        ("rect", (0.18, 0.88, 0.82, 1)),
    ],
}
PATTERNS = ("solid", "striped", "dotted", "checked", "zigzag")
BACKGROUND_TEXTURES = ("plain", "noise", "gradient")


@dataclasses.dataclass(frozen=True)
class ObjectLook:
  """What a product looks like, whatever the photo: two products with equal looks
  render the same base image."""
  shape: str
  aspect: float  # width / height of the object's box
  fill: float  # the box's longer side as a share of the image side, at scale 1
  colour: tuple[int, int, int]
  pattern: str
  pattern_angle: float  # radians; direction of stripes and zigzags
  pattern_period: float  # as a share of the object's longer side


@dataclasses.dataclass(frozen=True)
class ListingView:
  """How one seller photographed the product."""
  angle: float = 0.0  # degrees, counter-clockwise
  offset: tuple[float, float] = (0.0, 0.0)  # shares of the image side
  scale: float = 1.0
  background: tuple[int, int, int] = (255, 255, 255)
  background_texture: str = "plain"
  brightness: float = 0.0  # added to every channel after contrast
  contrast: float = 1.0
  jpeg_quality: int = 95


# The studio shot that sibling products are compared by: centred, white, neutral.
BASE_VIEW = ListingView()


def random_view(rng: np.random.Generator) -> ListingView:
  """A seller's photo: tilted, off-centre, zoomed, on their own backdrop."""
  if rng.random() < 0.15:
    background_level = rng.uniform(20, 80)
  else:
    background_level = rng.uniform(150, 255)
  background = np.clip(background_level + rng.uniform(-25, 25, size=3), 0, 255)
  return ListingView(
      angle=float(rng.uniform(-30, 30)),
      offset=(float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.12, 0.12))),
      scale=float(rng.uniform(0.7, 1.05)),
      background=tuple(int(channel) for channel in background),
      background_texture=BACKGROUND_TEXTURES[rng.integers(len(BACKGROUND_TEXTURES))],
      brightness=float(rng.uniform(-25, 25)),
      contrast=float(rng.uniform(0.75, 1.2)),
      jpeg_quality=int(rng.integers(35, 96)),
  )


def _object_box(look: ObjectLook, scale: float, image_size: int) -> tuple[float, float, float, float]:
  longer_side = look.fill * scale * image_size
  if look.aspect >= 1:
    width, height = longer_side, longer_side / look.aspect
  else:
    width, height = longer_side * look.aspect, longer_side
  centre = image_size / 2
  return centre - width / 2, centre - height / 2, centre + width / 2, centre + height / 2


def _shape_mask(look: ObjectLook, box: tuple[float, float, float, float], image_size: int) -> Image.Image:
  mask = Image.new("L", (image_size, image_size), 0)
  draw = ImageDraw.Draw(mask)
  left, top, right, bottom = box
  width, height = right - left, bottom - top

  def to_pixels(x: float, y: float) -> tuple[float, float]:
    return left + x * width, top + y * height

  def to_box(unit_box) -> tuple[float, float, float, float]:
    return (*to_pixels(*unit_box[:2]), *to_pixels(*unit_box[2:]))

  for kind, *spec in SHAPES[look.shape]:
    if kind == "polygon":
      draw.polygon([to_pixels(x, y) for x, y in spec[0]], fill=255)
    elif kind == "ellipse":
      draw.ellipse(to_box(spec[0]), fill=255)
    elif kind == "rect":
      draw.rectangle(to_box(spec[0]), fill=255)
    elif kind == "rounded":
      draw.rounded_rectangle(to_box(spec[0]), radius=spec[1] * min(width, height), fill=255)
    elif kind == "pieslice":
      draw.pieslice(to_box(spec[0]), spec[1], spec[2], fill=255)
    else:  # arc
      line_width = max(1, round(spec[3] * min(width, height)))
      draw.arc(to_box(spec[0]), spec[1], spec[2], fill=255, width=line_width)
  return mask


def _accent_colour(colour: tuple[int, int, int]) -> np.ndarray:
  """The pattern's second colour: a light tint of dark colours, a dark shade of light ones."""
  base = np.asarray(colour, np.float32)
  luminance = base @ np.asarray([0.299, 0.587, 0.114], np.float32)
  return base * 0.3 + 255 * 0.7 if luminance < 140 else base * 0.35


def _pattern_pixels(look: ObjectLook, period: float, image_size: int) -> np.ndarray:
  """The object's surface over the whole canvas, before the shape cuts it out."""
  rows, columns = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
  along = columns * np.cos(look.pattern_angle) + rows * np.sin(look.pattern_angle)
  across = -columns * np.sin(look.pattern_angle) + rows * np.cos(look.pattern_angle)
  half = period / 2
  if look.pattern == "striped":
    accent = (across // half) % 2 == 1
  elif look.pattern == "dotted":
    accent = (along % period - half) ** 2 + (across % period - half) ** 2 < (0.3 * period) ** 2
  elif look.pattern == "checked":
    accent = ((along // half) + (across // half)) % 2 == 1
  elif look.pattern == "zigzag":
    accent = ((across + half * np.abs((along % period) / half - 1)) // half) % 2 == 1
  else:
    accent = np.zeros((image_size, image_size), bool)
  return np.where(accent[..., None], _accent_colour(look.colour), np.asarray(look.colour, np.float32))


def _background_pixels(view: ListingView, rng: np.random.Generator, image_size: int) -> np.ndarray:
  background = np.broadcast_to(np.asarray(view.background, np.float32), (image_size, image_size, 3))
  if view.background_texture == "noise":
    return background + rng.normal(0, 12, size=(image_size, image_size, 1)).astype(np.float32)
  if view.background_texture == "gradient":
    ramp = np.linspace(-40, 40, image_size, dtype=np.float32)[:, None, None]
    return background + ramp
  return background


def render_pixels(look: ObjectLook, view: ListingView, image_size: int,
                  rng: np.random.Generator | None = None) -> np.ndarray:
  """The listing photo as uint8 [image_size, image_size, 3], before JPEG.

  rng draws the background's noise; it may be None for views without noise."""
  box = _object_box(look, view.scale, image_size)
  period = look.pattern_period * look.fill * view.scale * image_size
  offset = (view.offset[0] * image_size, view.offset[1] * image_size)
  # Surface and mask turn together, so the pattern follows the object's pose.
  mask = _shape_mask(look, box, image_size).rotate(view.angle, Image.BILINEAR, translate=offset)
  surface = Image.fromarray(_pattern_pixels(look, period, image_size).astype(np.uint8))
  surface = surface.rotate(view.angle, Image.BILINEAR, translate=offset)
  coverage = np.asarray(mask, np.float32)[..., None] / 255
  background = _background_pixels(view, rng, image_size)
  pixels = background * (1 - coverage) + np.asarray(surface, np.float32) * coverage
  pixels = (pixels - 128) * view.contrast + 128 + view.brightness
  return np.clip(pixels, 0, 255).round().astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, quality: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()
