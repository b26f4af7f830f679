"""Config: the TOML file, the files it includes and the environment → a valid `schemas.Config`,
or every problem at once, each with its file, line and dotted key.

- `load`: reading, merging, source precedence (flags > environment > TOML > defaults) and
  every check that needs the file system;
- `owned_options`: the llama-server options a config's `args` and `env` may not set, since the
  plan decides them, each with the key to use instead.

May import: schemas, errors, memory (a model file is checked as far as its GGUF header goes).
"""
