"""`aevb bench keys`, shortened: a few keys of a small model through the real training stage."""

import pytest
from shared_data import SHARED, needs_data

import vae
from benchmarks.cli import build_parser
from benchmarks.keys import FleetCase, fleet_benchmark, parse_cases


@pytest.mark.slow
@needs_data
def test_a_small_fleet_trains_every_key_and_reports_the_goals_measures() -> None:
    config = vae.VAEConfig(input_dim=784, latent_dim=2, hidden_dim=8, batch_size=50)
    cases = [FleetCase(1, 600), FleetCase(6, 100, max_models_in_memory=2)]
    result = fleet_benchmark("mnist", config.to_dict(), cases, data_dir=str(SHARED), probe_keys=3)
    single, fleet = result["cases"]
    assert [case["examples"] for case in result["cases"]] == [600, 600]
    assert fleet["case"] == {"keys": 6, "examples_per_key": 100, "max_models_in_memory": 2}
    for case in (single, fleet):
        assert case["samples_per_second"] > 0 and case["trainer_samples_per_second"] > 0
        # Parameters and accumulators of the 784-8-2 model, float32.
        assert case["state_bytes_per_key"] == 2 * 4 * vae.parameter_count(config)
        assert 0 < case["new_key_first_update_seconds"] <= case["new_key_first_update_seconds_p95"]
        assert case["checkpoint_seconds"] > 0 and case["snapshot_seconds"] > 0
        assert case["peak_rss_bytes"] > 200 * 2**20  # a child that imported TensorFlow
    # The bound: 1.5 x (2 models held x state) + 1.5 GB for the fleet, which holds 2 of 6.
    state = fleet["state_bytes_per_key"]
    assert fleet["memory_bound_bytes"] == int(1.5 * 2 * state + 1.5 * 2**30)
    assert result["new_key_first_update_seconds_max"] == max(
        single["new_key_first_update_seconds"], fleet["new_key_first_update_seconds"]
    )


def test_cases_parse_and_bad_ones_are_usage_errors() -> None:
    assert parse_cases("1x1000000,1000", 10**6, 500) == [
        FleetCase(1, 1_000_000),
        FleetCase(1000, 1000, max_models_in_memory=500),
    ]
    for text in ("ten", "0", "5x0", "3x"):
        with pytest.raises(ValueError, match="--keys"):
            parse_cases(text, 1000, 10)
    args = build_parser().parse_args(["keys", "--keys", "10,1000x1000", "--repeats", "3"])
    assert (args.keys, args.repeats, args.max_models_in_memory) == ("10,1000x1000", 3, 2000)
