"""Evaluation (SPEC §6): replication, membership inference and sample quality."""

from .membership import MembershipResult, membership_inference, reconstruction_errors, z_test
from .quality import (
    FeatureNet,
    QualityResult,
    frechet_distance,
    kernel_inception_distance,
    quality,
    train_feature_net,
)
from .replication import (
    ReplicationResult,
    extract_features,
    nearest_neighbours,
    replication,
    replication_sharded,
    replication_stream,
    save_pairs_grid,
)

__all__ = [
    "FeatureNet",
    "MembershipResult",
    "QualityResult",
    "ReplicationResult",
    "extract_features",
    "frechet_distance",
    "kernel_inception_distance",
    "membership_inference",
    "nearest_neighbours",
    "quality",
    "reconstruction_errors",
    "replication",
    "replication_sharded",
    "replication_stream",
    "save_pairs_grid",
    "train_feature_net",
    "z_test",
]
