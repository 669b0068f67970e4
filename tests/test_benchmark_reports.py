"""The shape matrix's report marks every cell against the issue's targets (synthetic results)."""

from benchmarks import shapes_report


def result(point, tokens, compiled, eager=1.01, recompiles=0):
    cfg = {"width": 512, "depth": 4, "vocab": 256, "head": "registered", "tokens": tokens}
    return {
        "point": point,
        "config": {**cfg, "dtype": "fp32"},
        "eager": {"ratio": eager, "ratio_formed": eager},
        "compiled": {"ratio": compiled, "ratio_formed": compiled + 0.01},
        "compile_ratio": 1.1,
        "retraction": {"alone_ratio": 1.05, "inside_ratio": 1.4},
        "recompiles": recompiles,
    }


def test_cells_use_the_target_of_their_token_count_and_the_median_of_processes():
    data = {
        "points": {
            "big#0": result("big", 1024, 1.04),
            "big#1": result("big", 1024, 1.02),
            "big#2": result("big", 1024, 1.025),
            "small#0": result("small", 128, 1.08, recompiles=1),
        }
    }
    text = shapes_report.render(data)
    big, small = (line for line in text.splitlines() if " tok, " in line)
    assert "1.025 (1.020-1.040) ✓" in big  # median of three processes, range, target 1.03
    assert "1.080 ✓" in small  # below 1024 tokens the target is 1.10
    assert "1.400 (1.400-1.400) ✗" in big  # the retraction inside the loop misses 1.3
    assert small.rstrip(" |").endswith("1 ✗")  # a recompile misses the target of 0
