"""common.data: calibration and evaluation data, offline assets."""
