"""The two towers and the TFRS model that trains them.

Index convention shared with the input pipeline and the export: row 0 of every embedding table is
the out-of-vocabulary / padding slot, known ids start at 1. That is exactly what a ``StringLookup``
with one OOV index produces, so the exported model can put the lookup in front of the same towers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow_recommenders as tfrs

from tracktower.features.tf import tf
from tracktower.training.config import ModelConfig


def _mlp(sizes: list[int], out_dim: int, dropout: float, name: str) -> tf.keras.Sequential:
    """Hidden ReLU layers then a linear projection to the shared embedding space."""
    layers: list[tf.keras.layers.Layer] = []
    for n in sizes:
        layers.append(tf.keras.layers.Dense(n, activation="relu"))
        if dropout > 0:
            layers.append(tf.keras.layers.Dropout(dropout))
    layers.append(tf.keras.layers.Dense(out_dim))
    return tf.keras.Sequential(layers, name=name)


class QueryTower(tf.keras.Model):
    """User → embedding, from the user id, the user's listening history, or both.

    The history is a right-padded matrix of track indices (0 = padding) pooled with a masked mean
    over the *shared* track embedding table, so a user the model has never seen can still be
    embedded from the tracks they just played.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_users: int,
        track_embedding: tf.keras.layers.Embedding,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.user_embedding = (
            tf.keras.layers.Embedding(n_users + 1, cfg.embedding_dim, name="user_embedding")
            if cfg.use_user_id
            else None
        )
        self.track_embedding = track_embedding
        n_inputs = int(cfg.use_user_id) + int(cfg.use_history)
        needs_mlp = bool(cfg.query_layers) or n_inputs > 1
        self.mlp = (
            _mlp(cfg.query_layers, cfg.embedding_dim, cfg.dropout, "query_mlp")
            if needs_mlp
            else None
        )

    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        user = self.user_embedding(inputs["user"]) if self.user_embedding is not None else None
        pooled = self.pool(inputs["history"]) if self.cfg.use_history else None
        return query_head(self.cfg, self.mlp, user, pooled, training=training)

    def pool(self, history: tf.Tensor) -> tf.Tensor:
        """Masked mean of the history's track embeddings (padding, index 0, left out); the
        export stores this table as an array so a server pools a session in numpy."""
        mask = tf.cast(tf.greater(history, 0), tf.float32)
        emb = self.track_embedding(history) * tf.expand_dims(mask, -1)
        count = tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0)
        return tf.reduce_sum(emb, axis=1) / count


def query_head(
    cfg: ModelConfig,
    mlp: tf.keras.Sequential | None,
    user: tf.Tensor | None,
    pooled: tf.Tensor | None,
    training: bool = False,
) -> tf.Tensor:
    """The query tower after its lookups: the exported SavedModel is this function with the
    user id hidden (the OOV user row), so it holds no embedding table of its own."""
    parts = [p for p in (user, pooled) if p is not None]
    x = parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)
    if mlp is not None:
        x = mlp(x, training=training)
    x = tf.cast(x, tf.float32)
    x = tf.math.l2_normalize(x, axis=-1) if cfg.normalize else x
    if cfg.track_bias:
        # The constant 1 meets the candidate's bias column: see CandidateTower.
        x = tf.concat([x, tf.ones_like(x[:, :1])], axis=-1)
    return x


class CandidateTower(tf.keras.Model):
    """Track index → embedding: the track id, plus its artist when the tracks file names one.

    The artist table maps track index → artist index inside the tower so that callers (training,
    export, serving) only ever pass track indices.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        track_embedding: tf.keras.layers.Embedding,
        track_artist: np.ndarray | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cfg = cfg
        self.track_embedding = track_embedding
        self.track_artist: tf.Tensor | None = None
        self.artist_embedding = None
        if track_artist is not None:
            self.track_artist = tf.constant(track_artist, dtype=tf.int32)
            n_artists = int(track_artist.max()) + 1
            self.artist_embedding = tf.keras.layers.Embedding(
                n_artists, cfg.embedding_dim, name="artist_embedding"
            )
        self.bias = (
            tf.keras.layers.Embedding(
                track_embedding.input_dim, 1, embeddings_initializer="zeros", name="track_bias"
            )
            if cfg.track_bias
            else None
        )
        needs_mlp = bool(cfg.candidate_layers) or self.artist_embedding is not None
        self.mlp = (
            _mlp(cfg.candidate_layers, cfg.embedding_dim, cfg.dropout, "candidate_mlp")
            if needs_mlp
            else None
        )

    def call(self, track: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = self.track_embedding(track)
        if self.artist_embedding is not None and self.track_artist is not None:
            artist = tf.gather(self.track_artist, track)
            x = tf.concat([x, self.artist_embedding(artist)], axis=-1)
        if self.mlp is not None:
            x = self.mlp(x, training=training)
        x = tf.cast(x, tf.float32)
        x = tf.math.l2_normalize(x, axis=-1) if self.cfg.normalize else x
        if self.bias is not None:
            # A per-track bias as one more embedding column (the query's is a constant 1), so the
            # score stays a plain dot product for export, brute force and ANN alike. Normalised
            # embeddings cannot carry popularity in their length; the bias can. It is scaled by
            # the temperature because the loss divides the whole dot product by it.
            scale = self.cfg.temperature if self.cfg.normalize else 1.0
            x = tf.concat([x, scale * tf.cast(self.bias(track), tf.float32)], axis=-1)
        return x


# TFRS takes log(clip(q, 1e-6, 1)) of the candidate sampling probabilities it is given.
_TFRS_MIN_Q = 1e-6


def sampling_probability(log_q: tf.Tensor) -> tf.Tensor:
    """``exp(log_q)`` times one constant that lifts the smallest to TFRS's floor of 1e-6.

    TFRS clips the probabilities at 1e-6 before subtracting their log. At catalogue scale that
    would flatten the correction: a uniform negative among 2.26M tracks has q = 4.4e-7, and most
    tracks' in-batch q is below one in a million. Multiplying every candidate's q by the same
    factor adds the same constant to every logit of a row, which the softmax ignores, so the
    loss is that of the exact correction as long as the largest q stays within a factor 10^6
    of the smallest (beyond that the largest are clipped at 1, as before).
    """
    lift = tf.maximum(math.log(_TFRS_MIN_Q) - tf.reduce_min(log_q), 0.0)
    return tf.exp(log_q + lift)


class TwoTowerModel(tfrs.Model):
    """Sampled softmax retrieval (in-batch negatives, optionally mixed with uniform ones) through
    ``tfrs.tasks.Retrieval``, or an exact softmax over the whole catalogue when it is small.

    Batches carry ``user``, ``history``, ``track``, ``weight`` and ``log_q`` (log sampling
    probability of the positive track), all prepared by :mod:`tracktower.training.pipeline`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_users: int,
        n_tracks: int,
        track_artist: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_tracks = n_tracks
        self.track_embedding = tf.keras.layers.Embedding(
            n_tracks + 1, cfg.embedding_dim, name="track_embedding"
        )
        history_embedding = (
            self.track_embedding
            if cfg.tie_track_embeddings
            else tf.keras.layers.Embedding(
                n_tracks + 1, cfg.embedding_dim, name="history_track_embedding"
            )
        )
        self.query_tower = QueryTower(cfg, n_users, history_embedding, name="query_tower")
        self.candidate_tower = CandidateTower(
            cfg,
            self.track_embedding,
            track_artist if cfg.use_artist else None,
            name="candidate_tower",
        )
        self.full_softmax = cfg.negatives == "full" or (
            cfg.negatives == "auto" and n_tracks <= cfg.full_softmax_max_tracks
        )
        # Its default loss is a categorical cross-entropy with SUM reduction: the sum over the
        # batch of weight x loss, the scale the full softmax below uses as well.
        self.task = tfrs.tasks.Retrieval(
            temperature=cfg.temperature if cfg.normalize else None,
            remove_accidental_hits=cfg.remove_accidental_hits,
        )
        self.build()

    def build(self, input_shape: Any = None) -> None:
        """Create every variable, without data, in the order the first training step would.

        Called on construction: Keras's BackupAndRestore can only restore into (and build the
        optimizer of) a built model, and a model without ``call`` is otherwise built lazily,
        inside its first training step.
        """
        self.query_tower({"user": tf.zeros([1], tf.int32), "history": tf.zeros([1, 1], tf.int32)})
        self.candidate_tower(tf.zeros([1], tf.int32))
        self.built = True

    @property
    def output_dim(self) -> int:
        """Width of both towers' outputs: the embedding plus the bias column when there is one."""
        return self.cfg.embedding_dim + int(self.cfg.track_bias)

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        query = self.query_tower(features, training=training)
        track = features["track"]
        if self.full_softmax:
            return self._full_softmax_loss(query, track, features["weight"], training)
        ids, log_q = track, features["log_q"]
        if self.cfg.uniform_negatives > 0:
            # Mixed negatives (Yang et al. 2020): in-batch negatives are popularity-biased, so add a
            # uniform sample whose log-probability corrects the same way as the in-batch ones.
            # Retrieval labels query i with candidate i (tf.eye(queries, candidates)), so the
            # extra columns after the batch's positives are negatives for every query.
            extra = tf.random.uniform(
                [self.cfg.uniform_negatives], 1, self.n_tracks + 1, dtype=track.dtype
            )
            ids = tf.concat([track, extra], 0)
            uniform = tf.fill([self.cfg.uniform_negatives], -tf.math.log(float(self.n_tracks)))
            log_q = tf.concat([log_q, uniform], 0)
        return self.task(
            query,
            self.candidate_tower(ids, training=training),
            sample_weight=features["weight"],
            candidate_sampling_probability=(
                sampling_probability(log_q) if self.cfg.logq_correction else None
            ),
            candidate_ids=ids if self.cfg.remove_accidental_hits else None,
            compute_metrics=False,
            compute_batch_metrics=False,
        )

    def _full_softmax_loss(
        self, query: tf.Tensor, track: tf.Tensor, weight: tf.Tensor, training: bool
    ) -> tf.Tensor:
        """Every track is a negative, so there is no sampling bias to correct (no logQ) and no
        accidental hit: the positive is one column of an exact softmax over the catalogue.

        Written out because the positive is the track's own catalogue column, which
        ``tfrs.tasks.Retrieval`` cannot express: its labels are always ``tf.eye``.
        """
        everything = self.candidate_tower(tf.range(1, self.n_tracks + 1), training=training)
        scores = tf.matmul(query, everything, transpose_b=True)
        if self.cfg.normalize:
            scores = scores / self.cfg.temperature
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=track - 1, logits=scores)
        return tf.reduce_sum(loss * weight)
