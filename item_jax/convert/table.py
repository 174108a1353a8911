"""The conversion engine: an outside layout is one table of rules, each naming an
item-jax parameter, the outside tensor it comes from, and the transform between.

`to_item` applies a table outside -> item-jax and `from_item` item-jax -> outside.
Both check every shape, that every source tensor is used and every target set,
and return a `Report` of what was left unset or ignored (also logged). Leftovers
the table does not allow, with its reason, are an error, never silently dropped.
Parameter names are item-jax's module paths joined by dots
("layers.0.attention.query.kernel"); `{layer}` in a rule stands for each layer.
"""

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Mapping

import jax
import numpy as np


_SHOWN_PROBLEMS = 20


class ConversionError(ValueError):
  """A table does not fit the tensors: wrong shapes, or leftovers it does not allow."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """outside tensor -> item-jax parameter (`forward`) and back (`backward`).

  forward(outside, item_shape) -> item value. backward(item value, current)
  -> outside tensor, where `current` is what earlier rules already wrote to
  the same outside tensor (None if nothing), so two item-jax parameters can
  share one outside tensor. A one-way transform has no backward.
  """

  name: str
  forward: Callable[[np.ndarray, tuple], np.ndarray]
  backward: Callable[[np.ndarray, np.ndarray | None], np.ndarray] | None = None


IDENTITY = Transform("identity", lambda x, shape: x, lambda y, current: y)
# torch.nn.Linear stores (out, in); our Dense kernels are (in, out).
TRANSPOSE = Transform("transpose", lambda x, shape: x.T, lambda y, current: y.T)
# Same values, the target's shape (a (1, 1, hidden) token -> (hidden,)); a
# size that differs is left for the shape check to report. One-way.
RESHAPE = Transform(
    "reshape", lambda x, shape: x.reshape(shape) if x.size == np.prod(shape) else x)


def _conv_to_dense(weight: np.ndarray, shape: tuple) -> np.ndarray:
  # (out, channels, rows, cols) -> (rows * cols * channels, out): our patches
  # are flattened (row, col, channel), see item_jax.model.item.patchify.
  out, channels, rows, cols = weight.shape
  return weight.transpose(2, 3, 1, 0).reshape(rows * cols * channels, out)


def conv_to_dense(patch_size: int) -> Transform:
  """A patch-embedding Conv2d (stride = kernel = patch_size) <-> our Dense."""
  def backward(kernel, current):
    channels = kernel.shape[0] // (patch_size * patch_size)
    return kernel.reshape(patch_size, patch_size, channels, -1).transpose(3, 2, 0, 1)
  return Transform("conv (out, in, kh, kw) -> dense (kh*kw*in, out)",
                   _conv_to_dense, backward)


def take_row(index: int) -> Transform:
  """One row of a table (a token's embedding) as a vector; backward writes
  the vector into that row of the table the other rules wrote."""
  def backward(vector, current):
    if current is None:
      raise ConversionError(f"row {index} has no table to go into: order the "
                            "table's own rule first")
    table = np.array(current)
    table[index] = vector
    return table
  return Transform(f"row {index}", lambda x, shape: x[index], backward)


def resize_positions(num_leading: int) -> Transform:
  """Position embeddings of a square patch grid, less `num_leading` non-grid
  rows (a [CLS] position), bilinearly resized to the target grid (one-way)."""
  def forward(table, shape):
    table = table.reshape(-1, table.shape[-1])[num_leading:]
    side, target_side = _grid_side(table.shape[0]), _grid_side(shape[0])
    if side == target_side:
      return table
    grid = table.reshape(side, side, -1)
    resized = jax.image.resize(grid, (target_side, target_side, grid.shape[-1]),
                               method="bilinear", antialias=False)
    return np.asarray(resized).reshape(target_side * target_side, -1)
  return Transform(f"drop {num_leading} leading, bilinear resize", forward)


def _grid_side(count: int) -> int:
  side = int(round(count ** 0.5))
  if side * side != count:
    raise ConversionError(f"{count} position embeddings are not a square grid")
  return side


@dataclasses.dataclass(frozen=True)
class Rule:
  target: str                     # item-jax parameter
  source: str                     # outside tensor
  transform: Transform = IDENTITY


def dense(target: str, source: str) -> tuple[Rule, ...]:
  """torch Linear `source`.{weight,bias} <-> our Dense `target`.{kernel,bias}."""
  return (Rule(f"{target}.kernel", f"{source}.weight", TRANSPOSE),
          Rule(f"{target}.bias", f"{source}.bias"))


def norm(target: str, source: str) -> tuple[Rule, ...]:
  """torch LayerNorm {weight,bias} <-> our LayerNorm {scale,bias}."""
  return (Rule(f"{target}.scale", f"{source}.weight"),
          Rule(f"{target}.bias", f"{source}.bias"))


@dataclasses.dataclass(frozen=True)
class Layout:
  """One outside layout: its rules and the leftovers it allows, with why.

  `ignored_sources`: outside tensors with no item-jax counterpart.
  `unset_targets`: item-jax parameters the outside layout has no tensor for.
  Keys are fnmatch patterns over names; values say why.
  """

  name: str
  rules: tuple[Rule, ...]
  ignored_sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
  unset_targets: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def expand(self, num_layers: int) -> list[Rule]:
    rules = []
    for rule in self.rules:
      if "{layer}" in rule.target:
        rules += [Rule(rule.target.format(layer=i), rule.source.format(layer=i),
                       rule.transform) for i in range(num_layers)]
      else:
        rules.append(rule)
    return rules


def _reason(name: str, patterns: Mapping[str, str]) -> str | None:
  for pattern, reason in patterns.items():
    if fnmatch.fnmatchcase(name, pattern):
      return reason
  return None


@dataclasses.dataclass
class Report:
  """What one conversion did: `set` names, `unset` and `ignored` name -> why."""

  layout: str
  direction: str
  set: list[str]
  unset: dict[str, str]
  ignored: dict[str, str]

  def summary(self) -> str:
    lines = [f"{self.layout} ({self.direction}): set {len(self.set)} tensors"]
    for title, leftovers in (("left unset", self.unset),
                             ("ignored", self.ignored)):
      by_reason = {}
      for name, reason in leftovers.items():
        by_reason.setdefault(reason, []).append(name)
      for reason, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)})" if len(names) > 4 else "")
        lines.append(f"  {title}: {shown}: {reason}")
    return "\n".join(lines)


def _leftovers(names, patterns: Mapping[str, str], problem: Callable[[str], str],
               problems: list[str]) -> dict[str, str]:
  """name -> the table's reason for each leftover; the others become problems."""
  allowed = {}
  for name in names:
    why = _reason(name, patterns)
    if why is None:
      problems.append(problem(name))
    else:
      allowed[name] = why
  return allowed


def _finish(layout: Layout, direction: str, written, unset: dict, ignored: dict,
            problems: list[str]) -> Report:
  if problems:
    shown = problems[:_SHOWN_PROBLEMS]
    if len(problems) > _SHOWN_PROBLEMS:
      shown.append(f"... and {len(problems) - _SHOWN_PROBLEMS} more")
    raise ConversionError(f"{layout.name} ({direction}) does not fit:\n  "
                          + "\n  ".join(shown))
  report = Report(layout.name, direction, sorted(written), unset, ignored)
  logging.info("conversion: %s", report.summary())
  return report


def to_item(layout: Layout, source: Mapping[str, np.ndarray],
            target_shapes: Mapping[str, tuple], num_layers: int):
  """Outside tensors -> ({item-jax name: float32 array}, Report)."""
  converted, used, problems, missing = {}, set(), [], {}
  for rule in layout.expand(num_layers):
    if rule.target not in target_shapes:
      problems.append(f"rule target {rule.target} is not an item-jax parameter")
      continue
    if rule.source not in source:
      missing[rule.target] = rule.source
      continue
    used.add(rule.source)
    value = np.asarray(rule.transform.forward(np.asarray(source[rule.source]),
                                              tuple(target_shapes[rule.target])))
    if value.shape != tuple(target_shapes[rule.target]):
      problems.append(
          f"{rule.source} {tuple(np.shape(source[rule.source]))} -> "
          f"{rule.target}: {value.shape} after {rule.transform.name}, "
          f"expected {tuple(target_shapes[rule.target])}")
      continue
    converted[rule.target] = value.astype(np.float32)
  unset = _leftovers(
      [name for name in target_shapes if name not in converted],
      layout.unset_targets,
      lambda name: f"not set: {name} " + (f"({missing[name]} is not in the source)"
                                          if name in missing else "(no rule)"),
      problems)
  ignored = _leftovers([name for name in source if name not in used],
                       layout.ignored_sources, lambda name: f"not used: {name}",
                       problems)
  return converted, _finish(layout, "to item-jax", converted, unset, ignored,
                            problems)


def from_item(layout: Layout, params: Mapping[str, np.ndarray], num_layers: int):
  """item-jax parameters -> ({outside name: float32 array}, Report)."""
  outside, used, problems = {}, set(), []
  for rule in layout.expand(num_layers):
    if rule.transform.backward is None:
      raise ConversionError(f"{layout.name}: {rule.transform.name} is one-way")
    if rule.target not in params:
      problems.append(f"item-jax parameter {rule.target} is missing")
      continue
    used.add(rule.target)
    # A writable copy: torch.from_numpy takes these as they are.
    outside[rule.source] = np.array(rule.transform.backward(
        np.asarray(params[rule.target]), outside.get(rule.source)), np.float32,
        order="C")
  # Here the item-jax side is the source: parameters the outside layout has no
  # place for must be allowed by the table's unset_targets.
  ignored = _leftovers([name for name in params if name not in used],
                       layout.unset_targets,
                       lambda name: f"no place for item-jax parameter {name}",
                       problems)
  return outside, _finish(layout, "from item-jax", outside, {}, ignored, problems)
