"""Text for calibration and evaluation: built-in offline corpora, hub datasets, local files."""
