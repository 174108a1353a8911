"""Mistakes a person can fix, told apart from bugs.

A `UserError` is raised where a check finds a mistake in what was asked: a
missing or unreadable input, a bad flag or config value, a work directory
without a run. Its message names the file, field or flag and says what to do;
`item-jax` prints it on one line and exits 2. Anything else that escapes a
command is a bug and keeps its traceback (as does a UserError under
`--debug` or ITEM_JAX_DEBUG=1).

UserError is a ValueError, and each variant below is also the built-in error
it replaces (FileNotFoundError, ...), so `except` clauses and tests written
for the built-in classes keep working.
"""


class UserError(ValueError):
  """A mistake in the input, flags or config; the message says what to fix."""


class MissingInputError(UserError, FileNotFoundError):
  """An input file or folder that is not there (or cannot be read)."""


class OutputExistsError(UserError, FileExistsError):
  """An output that is already there and must not be overwritten."""


class MissingDependencyError(UserError, ImportError):
  """An optional package that the asked-for work needs is not installed."""


def no_training_run(workdir) -> str:
  """The message for a work directory that holds no run (no config.json)."""
  return (f"no training run in {workdir} (no config.json): train one with "
          f"`item-jax train --config CONFIG --workdir {workdir}` (or convert "
          "a checkpoint into it with `item-jax convert`)")


def no_prepared_data(data_dir) -> str:
  """The message for a data folder that `prepare` did not write (no dataset.json)."""
  return (f"no prepared data in {data_dir} (no dataset.json): make it with "
          f"`item-jax prepare --catalogue FILE --output {data_dir}`")
