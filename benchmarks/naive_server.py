"""The naive way to serve the exported model, as the comparison point for ``serving.py``.

Loads ``saved_model/`` with ``tf.saved_model.load`` and calls its ``serving_default`` signature for
every request (a TF graph call that scores all candidates), then drops the user's training tracks
from the returned top_k list in Python. This is what one would write without the precomputed user
embeddings and numpy scoring that ``tracktower.serving`` uses; it exists only to measure the gap.

    python benchmarks/naive_server.py --artifact DIR [--host 127.0.0.1] [--port 8001]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException


def create_app(artifact: Path) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from tracktower.features.tf import tf

        model = tf.saved_model.load(str(artifact / "saved_model"))
        with np.load(artifact / "arrays.npz", allow_pickle=False) as arrays:
            track_ids = arrays["track_ids"].astype(str)
            indptr, indices = arrays["seen_indptr"], arrays["seen_indices"]
            users = arrays["user_ids"].astype(str).tolist()
        state["seen"] = {
            user: set(track_ids[indices[indptr[u] : indptr[u + 1]]].tolist())
            for u, user in enumerate(users)
        }
        state["model"] = model  # keeps the loaded object (and its variables) alive
        state["signature"] = model.signatures["serving_default"]
        state["tf"] = tf
        yield
        state.clear()

    app = FastAPI(title="tracktower-naive", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        if "signature" not in state:
            raise HTTPException(503, "loading")
        return {"status": "ok"}

    @app.get("/v1/users/{user_id}/recommendations")
    def recommendations(user_id: str, k: int = 10) -> dict[str, Any]:
        tf = state["tf"]
        out = state["signature"](user_id=tf.constant([user_id]))
        ids = [t.decode() for t in out["track_ids"].numpy()[0].tolist()]
        scores = out["scores"].numpy()[0].tolist()
        seen = state["seen"].get(user_id, set())
        items = [
            {"track_id": t, "score": s} for t, s in zip(ids, scores, strict=True) if t not in seen
        ]
        return {"user_id": user_id, "items": items[:k]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="artifact dir (manifest.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.artifact), host=args.host, port=args.port, workers=1)


if __name__ == "__main__":
    main()
