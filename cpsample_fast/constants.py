"""Integer ids shared by Python and the kernels: one home for each, mirrored once in C.

``csrc/cpsample/step_math.h`` holds the C mirror (``PredictionType``, ``NoiseMode``,
``kStream*``); ``tests/test_constants.py`` parses the header and checks that both sides agree.
Change a value here and there together. Nothing here imports torch.
"""

from __future__ import annotations

# What the model predicts (docs/ALGORITHM.md §1), by the id passed to the ops and kernels.
PREDICTION_TYPE_IDS: dict[str, int] = {"epsilon": 0, "v_prediction": 1, "sample": 2}
PREDICTION_TYPES: tuple[str, ...] = tuple(PREDICTION_TYPE_IDS)

# Where the fused update's step noise z comes from (docs/CONTRACTS.md "The fused update").
NOISE_NONE = 0  # deterministic step (η = 0, or the last step)
NOISE_TENSOR = 1  # an explicit z tensor
NOISE_DRAW = 2  # drawn in the kernel from the counter-based Philox stream

# Seeds are 64-bit Philox keys: every seed argument lies in [0, SEED_LIMIT).
SEED_LIMIT = 2**64
# Sample indices (sample_offset + b) fill the 32-bit counter word c1: [0, SAMPLE_INDEX_LIMIT).
SAMPLE_INDEX_LIMIT = 2**32

# Philox4x32-10 (Salmon et al. 2011; identical to triton.language.random and Random123).
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

# Counter word c3 of the Philox draws: which stream a normal belongs to (docs/ALGORITHM.md §4).
STREAM_STEP = 0  # per-step noise z of the sampling loop
STREAM_INITIAL = 1  # initial noise x_T
STREAM_MEMBERSHIP = 2  # forward-noising ε of the membership-inference attack (§6)


def prediction_type_id(prediction_type: str | int) -> int:
    """The id of a prediction type given by name or id; ValueError naming the choices otherwise."""
    if isinstance(prediction_type, str):
        if prediction_type in PREDICTION_TYPE_IDS:
            return PREDICTION_TYPE_IDS[prediction_type]
    elif (
        isinstance(prediction_type, int)
        and not isinstance(prediction_type, bool)
        and prediction_type in PREDICTION_TYPE_IDS.values()
    ):
        return int(prediction_type)
    raise ValueError(
        f"prediction_type must be one of {PREDICTION_TYPES} or an id in "
        f"{tuple(PREDICTION_TYPE_IDS.values())}, got {prediction_type!r}"
    )
