"""Block-by-block AQLM calibration, block and global fine-tuning, PV-tuning."""
