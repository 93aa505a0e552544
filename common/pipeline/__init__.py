"""common.pipeline: the block driver: capture, streaming, resume, data parallelism."""
