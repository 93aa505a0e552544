"""common.cli: command-line flags shared by the front ends."""
