"""The `opt` command line."""
