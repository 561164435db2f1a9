"""What is being served: the manifest summary of the loaded artifact, with its retrieval index
(backend, parameters, build time and the recall measured at export).

``uri`` is the registry URI (``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``) the server loaded,
which a client can pass to ``tracktower`` itself; a server following an alias shows the version
it serves now (``models:/NAME/VERSION``, changed by a hot swap, ``serving/swap.py``), each
request answered from one version throughout. A model served from a local directory has
``uri: null``: its path says nothing a client can use and something about the server's disk
that it should not, and ``name`` and ``run_id`` identify the model either way.
"""

from __future__ import annotations

from fastapi import APIRouter

from tracktower.serving.deps import ServingDep
from tracktower.serving.schemas import (
    DatasetSummary,
    ErrorResponse,
    IndexSummary,
    ModelSummary,
)

router = APIRouter(prefix="/v1", tags=["model"])


@router.get("/model", response_model=ModelSummary, responses={503: {"model": ErrorResponse}})
async def model_summary(serving: ServingDep) -> ModelSummary:
    recommender, loaded = serving.recommender, serving.model
    manifest = recommender.manifest
    return ModelSummary(
        name=loaded.name,
        version=loaded.version,
        uri=public_uri(loaded.uri),
        run_id=manifest.run_id,
        created_at=manifest.created_at,
        format_version=manifest.format_version,
        embedding_dim=manifest.embedding_dim,
        has_history_tower=manifest.has_history_tower,
        metrics=manifest.metrics,
        dataset=DatasetSummary.model_validate(manifest.dataset.model_dump()),
        counts={
            "users": recommender.n_users,
            "tracks": recommender.n_tracks,
            "seen_interactions": recommender.seen.nnz,
        },
        libraries=manifest.libraries,
        index=IndexSummary.model_validate(recommender.index_info.to_dict()),
    )


def public_uri(uri: str | None) -> str | None:
    """The URI when it names a registry entry or a run, else None (see the module)."""
    if uri is not None and uri.startswith(("models:/", "runs:/")):
        return uri
    return None
