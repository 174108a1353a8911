"""`python -m item_jax.cli`, as `python -m item_jax`."""

from item_jax.cli import main

main()
