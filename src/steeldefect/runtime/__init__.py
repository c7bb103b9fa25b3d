"""Running a deployed model file: the LiteRT interpreter, what a model file says about itself
(`Classifier`), its embedded metadata and the uncertainty rule it carries. Imports only `core`."""
