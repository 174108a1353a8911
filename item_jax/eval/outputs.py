"""Where the files of an `item-jax embed` output lie beside OUTPUT.npy, named
once for their writers (`embed`, `serve`) and their readers (`neighbours`),
without either side's imports."""

import os


def photos_path(output: str) -> str:
  """OUTPUT.mobilenet.npy: ImageNet MobileNetV2's photo features of the rows
  of OUTPUT.npy (`embed --with-mobilenet`)."""
  return os.fspath(output).removesuffix(".npy") + ".mobilenet.npy"
