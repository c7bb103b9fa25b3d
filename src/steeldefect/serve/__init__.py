"""The HTTP service for the line (`steeldefect serve`): the FastAPI app, its audit log and the
inspector's web page. Imports `core`, `runtime`, `data` and `deploy`, never `study`."""
