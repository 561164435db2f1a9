"""The naive way to serve the exported model, as the comparison point for ``serving.py``.

Loads ``saved_model/`` with ``tf.saved_model.load`` and, for every request, pools the user's seen
tracks (the mean of their ``history_embeddings`` rows), calls the SavedModel's
``query_from_pooled_history`` signature (a TF graph call), scores every candidate with numpy and
ranks with ``features.ranking.top_k``, seen tracks excluded. This is what one would write without
the user embeddings and lists that export precomputes and ``tracktower.serving`` looks up; it
exists only to measure the gap. Its answers equal the real server's for a model
without a user-id embedding (``model.use_user_id: false``); with one, the server's known-user
embeddings also carry the id, which the history signature hides.

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

from tracktower.features import ranking
from tracktower.features.artifact import (
    HISTORY_INPUT,
    HISTORY_OUTPUT,
    HISTORY_SIGNATURE,
    SAVED_MODEL_DIR,
    read_arrays,
    read_manifest,
    seen_matrix,
)


def _load(artifact: Path, state: dict[str, Any]) -> None:
    from tracktower.features.tf import tf

    arrays = read_arrays(artifact, read_manifest(artifact))
    track_ids = arrays["track_ids"]
    seen = seen_matrix(arrays)
    model = tf.saved_model.load(str(artifact / SAVED_MODEL_DIR))
    state.update(
        tf=tf,
        model=model,  # keeps the loaded object (and its variables) alive
        signature=model.signatures[HISTORY_SIGNATURE],
        track_ids=track_ids.tolist(),
        history=arrays["history_embeddings"],
        candidates=np.asarray(arrays["track_embeddings"]),
        users={u: i for i, u in enumerate(arrays["user_ids"].tolist())},
        seen=seen,
    )


def _recommend(state: dict[str, Any], user_id: str, k: int) -> list[dict[str, Any]]:
    u = state["users"].get(user_id)
    seen = state["seen"]
    rows_seen = seen.indices[seen.indptr[u] : seen.indptr[u + 1]] if u is not None else []
    table = state["history"]
    pooled = (
        table[rows_seen].mean(axis=0) if len(rows_seen) else np.zeros(table.shape[1], np.float32)
    )
    out = state["signature"](**{HISTORY_INPUT: state["tf"].constant(pooled[None, :])})
    query = out[HISTORY_OUTPUT].numpy()[0]
    scores = (state["candidates"] @ query)[None, :]
    rows = None if u is None else np.array([u])
    idx, top = ranking.top_k(scores, k, exclude=None if u is None else seen, rows=rows)
    return [
        {"track_id": state["track_ids"][i], "score": s}
        for i, s in zip(idx[0].tolist(), top[0].tolist(), strict=True)
        if i >= 0
    ]


def create_app(artifact: Path) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _load(artifact, state)
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
        return {"user_id": user_id, "items": _recommend(state, user_id, k)}

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
