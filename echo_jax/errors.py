"""Errors whose message tells the whole story: what is wrong, and what to do. A launch that fails with one prints the
message alone (`train_pretrain.py`, `runtime.exit_at_once_on_error`): the traceback of a refused config buried the one
line that mattered under thirty that did not. Every other error keeps its traceback, which is what a bug needs."""


class UserError(Exception):
  """A failure of the user's input or surroundings (a config value, the run directory, the device memory, a
  diverging run), explained in its message; raised as a subclass that also derives from the built-in error it is."""


class ConfigError(UserError, ValueError):
  """A config value that the run cannot use, named in the message with the --config flag that changes it."""
