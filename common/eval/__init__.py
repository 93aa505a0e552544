"""common.eval: perplexity and lm-eval."""
