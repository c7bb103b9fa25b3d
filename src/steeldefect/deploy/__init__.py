"""What goes to the line: exporting LiteRT files, heatmaps, predicting images and scoring archives.
Imports the layers below it (`core`, `runtime`, `data`, `models`)."""
