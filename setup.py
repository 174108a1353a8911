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
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "clu==0.0.12",
    "ml-collections==1.1.0",
    "etils[epath]==1.15.0",
    "pillow==13.0.0",
]

EXTRAS_REQUIRE = {
    "test": ["pytest==9.2.0", "pytest-timeout==2.4.0"],
    # Conversion and parity checks against the PyTorch stack.
    "torch": ["torch==2.13.0", "safetensors==0.8.0"],
    "tpu": ["jax[tpu]==0.10.2"],
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
