"""The service's endpoints for the line's learning loop (issue #26), behind the token like the rest:

- ``GET /v1/review/queue?status=pending|decided|all&limit=&after=``: the review store's images with
  their first answer and latest decision;
- ``GET /v1/review/image/{sha256}``: a stored image's bytes (the id is checked as 64 hex characters,
  never used as a path as given);
- ``POST /v1/review/{sha256}``: a decision, JSON ``{reviewer, decided_class, new_kind, note,
  idempotency_key}``;
- ``POST /v1/model``: an uploaded model (multipart part ``file``, or the raw body), checked then
  switched to; ``POST /v1/model/rollback``: back to the previous model (serve/swap.py);
- ``GET /v1/drift``: the drift monitor's window, tests and alarm (serve/drift.py).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at definition time.
import asyncio
import json
from typing import Any

from steeldefect.serve.errors import Reject
from steeldefect.serve.review import ReviewError, ReviewStore
from steeldefect.serve.swap import ModelSlot, SwapError

MAX_REVIEW_BODY = 16 * 1024


def add_loop_routes(app: Any, *, slot: ModelSlot, store: ReviewStore | None, max_model_bytes: int) -> None:
    """Register the review, model-swap and drift endpoints on ``app``."""
    from fastapi import Request
    from fastapi.responses import Response

    def need_store() -> ReviewStore:
        if store is None:
            raise Reject(404, "the review store is off (start the server with --review DIR)")
        return store

    def rejected(error: ReviewError | SwapError) -> Reject:
        return Reject(error.status, str(error) if isinstance(error, ReviewError) else error.message)

    @app.get("/v1/review/queue", summary="Images kept for review, oldest first, with answer and latest decision")
    async def review_queue(status: str = "pending", limit: int = 100, after: str = ""):
        review = need_store()
        if not 1 <= limit <= 1000:
            raise Reject(422, f"limit must be between 1 and 1000, got {limit}")
        try:
            entries = await asyncio.to_thread(review.queue, status=status, limit=limit, after=after)
        except ReviewError as error:
            raise rejected(error) from None
        return {
            "entries": entries,
            "class_names": list(slot.current.info.class_names),
            "next_after": entries[-1]["first_seen"] if len(entries) == limit else None,
        }

    @app.get("/v1/review/image/{sha256}", summary="A stored image's bytes")
    async def review_image(sha256: str):
        review = need_store()
        try:
            data, media_type = await asyncio.to_thread(review.image, sha256)
        except ReviewError as error:
            raise rejected(error) from None
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/v1/review/{sha256}", summary="Record a reviewer's decision on a stored image")
    async def review_decide(sha256: str, request: Request):
        review = need_store()
        raw = await request.body()
        if len(raw) > MAX_REVIEW_BODY:
            raise Reject(413, f"a review is at most {MAX_REVIEW_BODY} bytes of JSON")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise Reject(
                422, "a review is a JSON object (reviewer, decided_class, new_kind, note, idempotency_key)"
            ) from None
        try:
            return await asyncio.to_thread(review.decide, sha256, body, slot.current.info.class_names)
        except ReviewError as error:
            raise rejected(error) from None

    @app.post("/v1/model", summary="Upload a model: stored, checked, then served (multipart 'file' or raw body)")
    async def upload_model(request: Request):
        if slot.folder is None:
            raise Reject(403, "model upload needs the server started with a token (--token or $STEELDEFECT_TOKEN)")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=4)
            except Exception as error:  # python-multipart on a malformed body
                raise Reject(400, f"malformed multipart body ({error})") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise Reject(422, "multipart body has no file part named 'file'")
            data, source = await upload.read(), f"upload {upload.filename or 'file'}"
        else:
            data, source = await request.body(), "upload"
        try:
            served = await asyncio.to_thread(slot.install, data, source)
        except SwapError as error:
            raise rejected(error) from None
        return {
            "serving": served.fields,
            "previous": slot.previous.fields if slot.previous is not None else None,
            "class_names": list(served.info.class_names),
        }

    @app.post("/v1/model/rollback", summary="Serve the previous model again")
    async def rollback_model():
        try:
            served = await asyncio.to_thread(slot.rollback)
        except SwapError as error:
            raise rejected(error) from None
        return {"serving": served.fields, "previous": slot.previous.fields if slot.previous is not None else None}

    @app.get("/v1/drift", summary="Drift monitor: rolling class mix and uncertain share, tests, alarm")
    async def drift():
        return {"model": slot.current.fields, **slot.current.extra["drift"].status()}
