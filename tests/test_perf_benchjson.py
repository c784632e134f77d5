"""Reading pytest-benchmark JSON (harness.perf.benchjson)."""
from __future__ import annotations

import json

import pytest

from harness.errors import HarnessError
from harness.perf import benchjson


def bench(name: str, data: list[float] | None, **extra) -> dict:
    stats = {"min": 1.0, "max": 1.0, "mean": 1.0, "rounds": len(data or [])}
    if data is not None:
        stats["data"] = data
    return {"group": None, "name": name, "fullname": f"tests/x.py::{name}", "params": None,
            "extra_info": extra, "stats": stats}


def write(tmp_path, benchmarks, name="b.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"machine_info": {"cpu": "x"}, "commit_info": {"id": "abc", "dirty": False},
                                "benchmarks": benchmarks, "datetime": "2026-05-01T10:00:00+00:00"}))
    return str(path)


def test_reads_raw_samples_and_extra_info(tmp_path):
    info = benchjson.extra_info("qwen3-0.6b", "emulator", "tpot", samples=[0.1] * 6,
                                metrics={"decode_tps": {"unit": "tok/s", "samples": [10.0] * 6}})
    f = benchjson.load(write(tmp_path, [bench("test_ttft", [0.5] * 6, model="qwen3-0.6b",
                                                    deployment="emulator", metric="ttft"),
                                              bench("test_decode", [0.8] * 6, **info)]))
    by = {s.metric: s for s in f.series}
    assert set(by) == {"ttft", "tpot", "decode_tps"}
    assert by["ttft"].samples == (0.5,) * 6 and by["ttft"].direction == "lower"
    assert by["tpot"].samples == (0.1,) * 6  # extra_info samples win over the per-round wall times
    assert by["decode_tps"].direction == "higher" and by["decode_tps"].key == ("qwen3-0.6b", "emulator", "decode_tps")
    assert f.machine_info == {"cpu": "x"} and f.commit_info["id"] == "abc"


def test_defaults_without_extra_info(tmp_path):
    doc = bench("test_prefill[qwen3-0.6b]", [1.0] * 6)
    doc["params"] = {"model": "qwen3-0.6b"}
    (s,) = benchjson.load(write(tmp_path, [doc])).series
    assert (s.model, s.deployment, s.metric, s.unit) == ("qwen3-0.6b", "unknown", "test_prefill[qwen3-0.6b]", "s")


@pytest.mark.parametrize("content, match", [
    ("not json", "not JSON"),
    ('{"a": 1}', "not a pytest-benchmark JSON file"),
    ('{"benchmarks": []}', "holds no benchmarks"),
    ('{"benchmarks": [{"name": "x"}]}', "no 'stats'"),
])
def test_not_a_benchmark_file_names_the_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(HarnessError, match=match) as exc:
        benchjson.load(path)
    assert "bad.json" in str(exc.value)


def test_missing_raw_data_says_how_to_fix(tmp_path):
    path = write(tmp_path, [bench("test_ttft", None)])
    with pytest.raises(HarnessError, match="--benchmark-save-data") as exc:
        benchjson.load(path)
    assert "test_ttft" in str(exc.value) and "b.json" in str(exc.value)


def test_missing_file_and_duplicates(tmp_path):
    with pytest.raises(HarnessError, match="nope.json"):
        benchjson.load(tmp_path / "nope.json")
    dup = [bench("a", [1.0] * 6, model="m", metric="ttft"), bench("b", [1.0] * 6, model="m", metric="ttft")]
    with pytest.raises(HarnessError, match="same model/deployment/metric"):
        benchjson.load(write(tmp_path, dup))


def test_bad_direction_is_reported(tmp_path):
    with pytest.raises(HarnessError, match="direction"):
        benchjson.load(write(tmp_path, [bench("a", [1.0] * 6, direction="sideways")]))


def test_pair_matches_exactly_then_by_model_and_metric(tmp_path):
    base = benchjson.load(write(tmp_path, [bench("t", [1.0] * 6, model="m", deployment="emu", metric="ttft"),
                                           bench("u", [1.0] * 6, model="m", deployment="emu", metric="only_base")],
                                "base.json"))
    same = benchjson.load(write(tmp_path, [bench("t", [1.0] * 6, model="m", deployment="emu", metric="ttft")], "c1.json"))
    pairs, only_b, only_c = benchjson.pair(base, same)
    assert [(b.metric, c.metric) for b, c in pairs] == [("ttft", "ttft")]
    assert [s.metric for s in only_b] == ["only_base"] and only_c == []
    other = benchjson.load(write(tmp_path, [bench("t", [1.0] * 6, model="m", deployment="npu", metric="ttft")], "c2.json"))
    pairs, _, only_c = benchjson.pair(base, other)
    assert [(b.deployment, c.deployment) for b, c in pairs] == [("emu", "npu")] and only_c == []
