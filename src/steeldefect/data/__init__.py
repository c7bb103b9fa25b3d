"""Images in: dataset layouts and decoding, the decoded-image cache, splits, defect boxes, the
steel-surface augmentation and `data inspect`. Imports `core` and `runtime` only."""
