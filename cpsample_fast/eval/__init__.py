"""Evaluation (docs/ALGORITHM.md §6): replication, membership, quality, rejection baseline."""

from .membership import MembershipResult, membership_inference, reconstruction_errors, z_test
from .quality import (
    FeatureNet,
    QualityResult,
    frechet_distance,
    kernel_inception_distance,
    quality,
    train_feature_net,
)
from .rejection import RejectionResult, rejection_sample
from .replication import (
    ReplicationResult,
    blurred_replication,
    extract_features,
    gaussian_blur,
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
    "RejectionResult",
    "ReplicationResult",
    "blurred_replication",
    "extract_features",
    "frechet_distance",
    "gaussian_blur",
    "kernel_inception_distance",
    "membership_inference",
    "nearest_neighbours",
    "quality",
    "reconstruction_errors",
    "rejection_sample",
    "replication",
    "replication_sharded",
    "replication_stream",
    "save_pairs_grid",
    "train_feature_net",
    "z_test",
]
