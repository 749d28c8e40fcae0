"""`vsm bench` on the tiny preset: the report's shape and keys (never its timings), the plot, bad input."""

import json

import pytest

SOURCES = ("shared", "lm", "detector", "sam")
SIDE_KEYS = {"latency_s", "latency_runs_s", "parts_s", "flops", "weight_bytes", "activation_peak_bytes",
             "peak_memory_bytes", "gflops_per_s"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from modeling_vsm.cli import main

    output = tmp_path_factory.mktemp("bench") / "bench.json"
    code = main(["bench", "--preset", "tiny", "--output", str(output), "--runs", "1", "--mask-counts", "1,2",
                 "--new-tokens", "2"])
    assert code == 0
    assert output.with_suffix(".png").stat().st_size > 0
    return json.loads(output.read_text())


def test_report_has_every_measurement(report):
    assert report["preset"] == "tiny" and report["runs"] == 1 and report["memory_method"]
    assert report["inputs"]["prompt_positions"] == 64 + 40  # the tiny preset reads its 64 patches once
    assert set(report["dtypes"]) == {"fp32", "bf16"}
    for entry in report["dtypes"].values():
        assert entry["matmul_gflops"] > 0
        assert set(entry["sources"]) == set(SOURCES)
        for source, result in entry["sources"].items():
            if "error" in result:  # a source this version cannot build is recorded, not fatal
                assert isinstance(result["error"], str)
                continue
            for side in ("vsm", "bare"):
                assert SIDE_KEYS <= set(result[side]), (source, side)
                assert result[side]["latency_s"] > 0 and result[side]["weight_bytes"] > 0
            assert {"vision_tower", "dense_encoder", "lm_prefill", "mask_decoder", "total"} <= set(result["vsm"]["flops"])
            assert result["vsm"]["flops"]["lm_prefill"] > 0 and result["vsm"]["flops"]["mask_decoder"] > 0
            assert result["time_vs_bare"] > 0
        assert {"vision_tower", "lm_prefill", "mask_decoder"} <= set(entry["bare_components"])
        generate = entry["text_generate"]
        assert generate["new_tokens"] == 2 and generate["same_tokens"] and generate["overhead_ratio"] > 0
    built = [s for s in SOURCES if "error" not in report["dtypes"]["fp32"]["sources"][s]]
    assert {"shared", "lm"} <= set(built)
    if "sam" in built:
        ratios = report["dtypes"]["fp32"]["ratios"]
        assert {"sam_vs_shared", "sam_vs_lm"} <= set(ratios)
        assert ratios["sam_vs_shared"]["bare_flops"] > 1  # SAM's encoder adds work
    assert set(report["mask_decoding"]) == {"1", "2"}
    assert {"one_call_s", "k_calls_s", "auto_s", "auto_chunk_size"} <= set(report["mask_decoding"]["2"])
    assert "generate_vs_bare" in report["targets_status"]["fp32"]


def test_bad_input_is_one_line_and_non_zero(tmp_path, capsys):
    from modeling_vsm.cli import main

    output = str(tmp_path / "bench.json")
    assert main(["bench", "--preset", "tiny", "--output", output, "--dtypes", "fp8"]) == 2
    assert "Unknown dtype(s) ['fp8']" in capsys.readouterr().err
    assert main(["bench", "--preset", "nope", "--output", output]) == 2
    assert main(["bench", "--preset", "tiny", "--output", output, "--sources", "clip"]) == 2
    assert main(["bench", "--preset", "tiny", "--output", output, "--mask-counts", "a"]) == 2
