"""`python -m item_jax` is the `item-jax` command."""

from item_jax.cli import main

if __name__ == "__main__":
  main()
