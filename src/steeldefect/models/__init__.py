"""Models: the backbone registry and the Lite0 port, Keras -> LiteRT conversion settings, cached
backbone features, head training and fine-tuning. Imports `core`, `runtime` and `data`."""
