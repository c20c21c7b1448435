"""Application layer: jobs and recipes that wire data, pipeline, formats and eval together.

``pipeline/`` holds the algorithms (calibration, block and global fine-tuning, PV-tuning); this
package decides which of them a user's command runs, in what order, with which knobs, and what
it reports. The CLI only parses arguments and calls in here.
"""
