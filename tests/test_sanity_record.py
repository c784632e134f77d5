"""Phase 0's record: the entry-only checks are reused by a later gate only on the very files they judged,
verified in that run, under the same code and versions (and the store's key when one is set)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import harness.suites.sanity as sanity
from harness.store import GoldenRequest, GoldenStore
from harness.store.golden import GoldenSet
from harness.suites import sanity_record
from harness.weights import WeightsSource, load_weights

MODEL = "qwen3-0.6b"


@pytest.fixture
def entry(golden_root: Path, tmp_path: Path) -> GoldenSet:
    """A private copy of a session golden (the record is written into the entry)."""
    golden = GoldenStore(golden_root).get(GoldenRequest(MODEL, "tiny", 0, 2))
    copy = tmp_path / golden.path.name
    shutil.copytree(golden.path, copy, ignore=shutil.ignore_patterns(sanity_record.RECORD))
    return GoldenSet(copy, golden.manifest)


@pytest.fixture
def reruns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the entry-only checks actually run."""
    ran: list[str] = []
    for name in sanity.REUSABLE:
        real = getattr(sanity, name)
        monkeypatch.setattr(sanity, name, lambda *a, _real=real, _name=name: (ran.append(_name), _real(*a))[1])
    return ran


def _weights(golden: GoldenSet):
    return load_weights(golden.spec, WeightsSource(None), 0)


def test_a_later_gate_reuses_the_checks_on_the_same_files(entry: GoldenSet, reruns: list[str]) -> None:
    first = sanity.sanity_checks(entry, _weights(entry))
    assert [c.id for c in first] == ["golden_integrity", *sanity.REUSABLE] and all(first)
    assert reruns == list(sanity.REUSABLE) and (entry.path / sanity_record.RECORD).is_file()
    again = sanity.sanity_checks(entry, _weights(entry))
    assert reruns == list(sanity.REUSABLE)  # nothing ran a second time
    assert [(c.id, c.passed) for c in again] == [(c.id, c.passed) for c in first]
    for before, after in zip(first[1:], again[1:]):
        assert after.metrics == {**before.metrics, "reused": True}
        assert after.message.startswith(before.message) and "earlier gate on these very files" in after.message
    assert "reused" not in again[0].metrics  # the integrity check itself is never reused


def test_a_record_of_other_bytes_versions_or_code_is_not_reused(entry: GoldenSet, reruns: list[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sanity.sanity_checks(entry, _weights(entry))
    path = entry.path / sanity_record.RECORD
    good = json.loads(path.read_text())
    for edit in ({"manifest_sha256": "0" * 64}, {"versions": {**good["versions"], "torch": "1.0"}},
                 {"versions": {**good["versions"], "code": "0" * 64}}, {"schema": 99}):
        path.write_text(json.dumps({**good, **edit}))
        before = len(reruns)
        checks = sanity.sanity_checks(entry, _weights(entry))
        assert len(reruns) == before + 3 and all(checks), edit
        assert json.loads(path.read_text())["manifest_sha256"] == good["manifest_sha256"]  # written afresh
    for damaged in (b"{not json", b"", b"[]", b'{"schema": 1}'):
        path.write_bytes(damaged)
        before = len(reruns)
        assert all(sanity.sanity_checks(entry, _weights(entry))) and len(reruns) == before + 3


def test_a_damaged_entry_runs_every_check_and_records_nothing(entry: GoldenSet, reruns: list[str]) -> None:
    sanity.sanity_checks(entry, _weights(entry))
    record = (entry.path / sanity_record.RECORD).read_bytes()
    victim = entry.path / "decode.1.safetensors"
    victim.write_bytes(victim.read_bytes()[:-8] + bytes(8))
    checks = sanity.sanity_checks(entry, _weights(entry))
    assert not checks[0] and "decode.1.safetensors" in checks[0].message
    assert len(reruns) == 6 and not any(c.metrics.get("reused") for c in checks)
    assert (entry.path / sanity_record.RECORD).read_bytes() == record


def test_under_a_signing_key_only_a_record_signed_with_it_is_reused(entry: GoldenSet, reruns: list[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.store import signing

    sanity.sanity_checks(entry, _weights(entry))  # recorded without a key: unsigned
    monkeypatch.setenv(signing.KEY_ENV, "k" * 32)
    signing.sign(entry.path, signing.signing_key())  # the entry itself is signed: integrity passes
    sanity.sanity_checks(entry, _weights(entry))
    assert len(reruns) == 6  # the unsigned record was ignored, and a signed one written
    sanity.sanity_checks(entry, _weights(entry))
    assert len(reruns) == 6  # reused
    path = entry.path / sanity_record.RECORD
    forged = json.loads(path.read_text())
    forged["checks"][0]["message"] = "edited"
    path.write_text(json.dumps(forged))
    checks = sanity.sanity_checks(entry, _weights(entry))
    assert len(reruns) == 9 and "edited" not in checks[1].message


def test_a_record_that_cannot_be_written_only_loses_the_saving(entry: GoldenSet, reruns: list[str]) -> None:
    (entry.path / sanity_record.RECORD).mkdir()  # in its way: a directory (as a read-only store refuses it)
    assert all(sanity.sanity_checks(entry, _weights(entry)))
    assert all(sanity.sanity_checks(entry, _weights(entry)))
    assert len(reruns) == 6 and sorted(p.name for p in entry.path.iterdir() if p.name.startswith(".")) == []
