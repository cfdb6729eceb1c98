"""The `aevb` command (`main.main`); `commands` holds what each subcommand does."""
