"""The HTTP service for the line (`steeldefect serve`): the FastAPI app, its audit log and the
inspector's web page. Imports `core`, `runtime`, `data` and `deploy`, never `study`.

Modules, bottom up: ``errors`` (start-up and per-request errors), ``pool`` (which model, the
interpreter pool, admission), ``gate`` (ASGI wrapper: metrics, token, body limit), ``audit`` (SQLite
audit log), ``review`` (the review store and decisions), ``swap`` (hot model swap), ``drift`` (drift monitor and
gauges), ``loop_routes`` (their endpoints), ``service`` (the app and its routes: ``create_app``),
``runner`` (``serve``: uvicorn)."""
