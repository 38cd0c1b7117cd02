"""`cloudach bench`'s overhead scenario, briefly: the synthetic model reached three ways."""

from __future__ import annotations

from bench import scenarios


def test_the_overhead_scenario_measures_all_three_layers_at_the_synthetic_models_pace():
    options = scenarios.Options(duration_s=1.5, max_tokens=20, tokens_per_s=200)
    rows = scenarios.overhead(options)
    assert [r["label"] for r in rows] == ["triton @1", "inference_svc @1", "edge @1"]
    for row in rows:
        assert row["errors"] == {} and row["requests"] >= 3
        # one stream at 200 tokens/s: each layer delivers the model's pace, not more
        assert 100 < row["output_tokens_per_s"] <= 210, row
        assert row["ttft_ms"]["p50"] >= 5  # the first token is due 5 ms after the request
    # only the edge row's run goes through the edge
    assert rows[2]["cpu_s"]["edge"] > 0 and rows[0]["cpu_s"]["edge"] < rows[2]["cpu_s"]["edge"]
