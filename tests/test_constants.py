"""The integer ids of constants.py and their C mirror in csrc/cpsample/step_math.h agree.

The header is parsed as text, so this runs without a built extension; every enumerator and
``constexpr`` the kernels use is compared with its Python home.
"""

import re
from pathlib import Path

import pytest

from cpsample_fast import constants, noise, ops, schedule

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "cpsample" / "step_math.h"


def _header_values() -> dict[str, int]:
    text = HEADER.read_text()
    values: dict[str, int] = {}
    for body in re.findall(r"enum\s+\w+\s*:\s*int\s*\{([^}]*)\}", text):
        for name, value in re.findall(r"(k\w+)\s*=\s*(\d+)", body):
            values[name] = int(value)
    for name, value in re.findall(r"constexpr\s+\w+\s+(k\w+)\s*=\s*(0x[0-9A-Fa-f]+|\d+)u?;", text):
        values[name] = int(value, 0)
    return values


C = _header_values()

PAIRS = [
    ("kEpsilon", constants.PREDICTION_TYPE_IDS["epsilon"]),
    ("kVPrediction", constants.PREDICTION_TYPE_IDS["v_prediction"]),
    ("kSample", constants.PREDICTION_TYPE_IDS["sample"]),
    ("kNoNoise", constants.NOISE_NONE),
    ("kExplicitNoise", constants.NOISE_TENSOR),
    ("kDrawnNoise", constants.NOISE_DRAW),
    ("kStreamStep", constants.STREAM_STEP),
    ("kStreamInitial", constants.STREAM_INITIAL),
    ("kStreamMembership", constants.STREAM_MEMBERSHIP),
    ("kPhiloxRoundA", constants.PHILOX_ROUND_A),
    ("kPhiloxRoundB", constants.PHILOX_ROUND_B),
    ("kPhiloxKeyA", constants.PHILOX_KEY_A),
    ("kPhiloxKeyB", constants.PHILOX_KEY_B),
    ("kPhiloxRounds", constants.PHILOX_ROUNDS),
]


@pytest.mark.parametrize(("c_name", "py_value"), PAIRS, ids=[p[0] for p in PAIRS])
def test_header_mirrors_python(c_name, py_value):
    assert c_name in C, f"{c_name} not found in {HEADER.name}"
    assert C[c_name] == py_value


def test_one_home_reexported():
    # The names other modules expose are the same objects, not copies.
    assert schedule.PREDICTION_TYPES is constants.PREDICTION_TYPES
    assert ops.PREDICTION_TYPE_IDS is constants.PREDICTION_TYPE_IDS
    assert noise.STREAM_STEP == constants.STREAM_STEP
    assert tuple(constants.PREDICTION_TYPE_IDS) == constants.PREDICTION_TYPES


@pytest.mark.parametrize("bad", ["eps", 3, -1, True, 1.0, None])
def test_prediction_type_id_rejects(bad):
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        constants.prediction_type_id(bad)


def test_prediction_type_id_accepts_names_and_ids():
    for name, i in constants.PREDICTION_TYPE_IDS.items():
        assert constants.prediction_type_id(name) == i
        assert constants.prediction_type_id(i) == i


def test_one_seed_rule():
    import argparse

    from cpsample_fast.cli import _args
    from cpsample_fast.validation import check_seed

    assert check_seed("seed", 0) == 0 and check_seed("seed", 2**64 - 1) == 2**64 - 1
    assert _args.seed(str(2**64 - 1)) == 2**64 - 1
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
            check_seed("seed", bad)
        with pytest.raises(argparse.ArgumentTypeError, match=r"\[0, 2\*\*64\)"):
            _args.seed(str(bad))
    with pytest.raises(TypeError, match="seed must be an int"):
        check_seed("seed", True)
