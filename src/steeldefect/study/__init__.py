"""The study over a run folder: calibration and out-of-fold trust, evaluation, the pipeline that
runs every stage, the report and the learning curve. The top of the data flow."""
