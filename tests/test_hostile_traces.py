"""Hostile trace directories: each is refused by `harness gate --trace` with exit 3 and one line
naming the file, quickly and before any golden is built.

Every case runs the real CLI in a subprocess with a timeout, so a regression that hangs (a FIFO opened
for reading blocks until a writer appears; /dev/zero never ends) fails the test instead of hanging CI.
The golden directory is an empty temp dir: a case that got as far as building a golden would leave
an entry in it, and the test checks it stays empty.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness.deployment import trace as tr
from harness.spec import model_spec, taps

MODEL = "qwen3-0.6b"
SPEC = model_spec.get(MODEL, "tiny")
HARNESS = os.path.join(os.path.dirname(sys.executable), "harness")
TIMEOUT = 60  # seconds; each refusal takes about one CLI start-up (~1-2 s)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A valid trace (random taps) with inputs.safetensors."""
    rng = np.random.default_rng(0)
    phases = {p: {n: rng.standard_normal(taps.shape(SPEC, n, 4 if p == "prefill" else 1)).astype(np.float32)
                  for n in taps.tap_names(SPEC)} for p in taps.phase_names(1)}
    d = tmp_path_factory.mktemp("hostile") / "base"
    tr.write_trace(d, MODEL, "tiny", 0, 1, phases, input_ids=np.arange(4), decode_tokens=[3])
    return d


def _set_weights(d: Path, weights: str) -> None:
    meta = json.loads((d / "trace.json").read_text())
    (d / "trace.json").write_text(json.dumps(meta | {"weights": weights}))


def _checkpoint(d: Path) -> Path:
    """A checkpoint folder ``ckpt`` in the trace (config.json only; the case adds the shard)."""
    ckpt = d / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(SPEC.config))
    _set_weights(d, "ckpt")
    return ckpt


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def fifo_inputs(d: Path, outside: Path) -> str:
    _replace_with_fifo(d / "inputs.safetensors")
    return "inputs.safetensors is a FIFO"


def fifo_phase(d: Path, outside: Path) -> str:
    _replace_with_fifo(d / "decode.0.safetensors")
    return "decode.0.safetensors is a FIFO"


def fifo_trace_json(d: Path, outside: Path) -> str:
    _replace_with_fifo(d / "trace.json")
    return "trace.json is a FIFO"


def fifo_shard(d: Path, outside: Path) -> str:
    os.mkfifo(_checkpoint(d) / "model.safetensors")
    return "model.safetensors is a FIFO"


def dev_zero_shard(d: Path, outside: Path) -> str:
    (_checkpoint(d) / "model.safetensors").symlink_to("/dev/zero")
    return "model.safetensors resolves to /dev/zero, outside the trace directory"


def dev_zero_inputs(d: Path, outside: Path) -> str:
    (d / "inputs.safetensors").unlink()
    (d / "inputs.safetensors").symlink_to("/dev/zero")
    return "inputs.safetensors resolves to /dev/zero"


def outside_symlink_shard(d: Path, outside: Path) -> str:
    (_checkpoint(d) / "model.safetensors").symlink_to(outside)
    return f"model.safetensors resolves to {outside}, outside the trace directory"


def outside_symlink_index_shard(d: Path, outside: Path) -> str:
    ckpt = _checkpoint(d)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../x.safetensors"}}))
    return "'ckpt/../../x.safetensors' points outside the trace directory"


def oversize_phase(d: Path, outside: Path) -> str:
    with open(d / "prefill.safetensors", "ab") as fh:
        fh.write(b"\0" * 4096)
    return "prefill.safetensors is "  # "... is N bytes, its header describes M: refused"


def oversize_shard(d: Path, outside: Path) -> str:
    shard = _checkpoint(d) / "model.safetensors"
    shutil.copy(outside, shard)
    with open(shard, "ab") as fh:
        fh.write(b"\0" * 64)
    return "model.safetensors is "


def header_claims_more_than_the_file(d: Path, outside: Path) -> str:
    path = d / "prefill.safetensors"
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    return "prefill.safetensors: not a readable safetensors file"


def weights_outside_by_dotdot(d: Path, outside: Path) -> str:
    _set_weights(d, "../outside.safetensors")
    return "'../outside.safetensors' points outside the trace directory"


def weights_absolute(d: Path, outside: Path) -> str:
    _set_weights(d, str(outside))
    return "points outside the trace directory"


def trace_json_symlink_outside(d: Path, outside: Path) -> str:
    target = outside.with_name("trace.json")
    target.write_text((d / "trace.json").read_text())
    (d / "trace.json").unlink()
    (d / "trace.json").symlink_to(target)
    return "trace.json resolves to"


def weights_folder_symlink_outside(d: Path, outside: Path) -> str:
    folder = outside.parent / "ckpt-outside"
    folder.mkdir(exist_ok=True)
    (d / "ckpt").symlink_to(folder, target_is_directory=True)
    _set_weights(d, "ckpt")
    return "weights file ckpt resolves to"


def directory_as_phase_file(d: Path, outside: Path) -> str:
    (d / "decode.0.safetensors").unlink()
    (d / "decode.0.safetensors").mkdir()
    return "decode.0.safetensors is a directory"


def device_node_inputs(d: Path, outside: Path) -> str | None:
    """A character device *inside* the trace (no symlink to escape through): refused as not regular."""
    (d / "inputs.safetensors").unlink()
    try:
        os.mknod(d / "inputs.safetensors", 0o600 | 0o020000, os.makedev(1, 5))  # S_IFCHR, /dev/zero's numbers
    except PermissionError:  # creating a device node needs CAP_MKNOD: the case is left out
        return None
    return "inputs.safetensors is a character device, not a regular file"


def huge_trace_json(d: Path, outside: Path) -> str:
    with open(d / "trace.json", "ab") as fh:
        fh.truncate(tr.MAX_JSON_BYTES + 1)  # sparse: no disk used
    return f"more than the {tr.MAX_JSON_BYTES} allowed"


CASES = [fifo_inputs, fifo_phase, fifo_trace_json, fifo_shard, dev_zero_shard, dev_zero_inputs,
         outside_symlink_shard, outside_symlink_index_shard, oversize_phase, oversize_shard,
         header_claims_more_than_the_file, weights_outside_by_dotdot, weights_absolute,
         trace_json_symlink_outside, weights_folder_symlink_outside, directory_as_phase_file, huge_trace_json,
         device_node_inputs]


def _gate(args: list[str], golden: Path) -> subprocess.Popen:
    env = {**os.environ, "NPU_HARNESS_GOLDEN_DIR": str(golden)}
    return subprocess.Popen([HARNESS, "gate", *args, "--golden-dir", str(golden)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    """(exit code or None when it had to be killed, stdout + stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out + err
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return None, out + err


# One child process runs every case through the CLI's real entry point (harness.cli.main, as the
# `harness` script does), one after the other: one interpreter start-up for all of them, and the
# child's timeout still turns any hang into a failure.
CHILD = """
import contextlib, io, json, sys
from harness.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    out.append([code, buf.getvalue()])
print(json.dumps(out))
"""


def _prepare(base: Path, tmp_path: Path) -> list[tuple[str, str, Path]]:
    outside = tmp_path / "outside" / "outside.safetensors"
    outside.parent.mkdir()
    shutil.copy(base / "inputs.safetensors", outside)
    cases = []
    for case in CASES:
        d = tmp_path / case.__name__
        shutil.copytree(base, d)
        expect = case(d, outside)
        if expect is not None:
            cases.append((case.__name__, expect, d))
    return cases


def _problem(name: str, expect: str, code: int | None, text: str) -> str | None:
    if code is None:
        return f"{name}: still running after {TIMEOUT} s (hangs)"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if code != 3 or not any(expect in ln for ln in lines):
        return f"{name}: exit {code}, expected 3 with {expect!r}; got:\n{text}"
    if "Traceback" in text:
        return f"{name}: traceback printed:\n{text}"
    return None


def test_every_hostile_trace_exits_3_with_one_line(base: Path, tmp_path: Path):
    """Every case, with and without --model, through the CLI entry point in one child process."""
    cases = _prepare(base, tmp_path)
    golden = tmp_path / "golden"
    argvs, labels = [], []
    for name, expect, d in cases:
        for extra in ([], ["--model", MODEL]):
            argvs.append(["gate", "--trace", str(d), *extra, "--golden-dir", str(golden)])
            labels.append((f"{name} {' '.join(extra)}".strip(), expect))
    # A valid trace gated with another --model: refused before any golden is built.
    argvs.append(["gate", "--trace", str(base), "--model", "llama-3.2-1b", "--golden-dir", str(golden)])
    labels.append(("wrong --model", f"records {MODEL} at scale tiny, not llama-3.2-1b at scale tiny"))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(argvs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    code, text = _finish(proc, TIMEOUT)
    assert code == 0, f"the child hung or died (exit {code}): {text[-2000:]}"
    results = json.loads(text.strip().splitlines()[-1])
    failures = [p for (label, expect), (rc, out) in zip(labels, results) if (p := _problem(label, expect, rc, out))]
    assert not failures, "\n".join(failures)
    # the cause is stated once, on one line (the gate's summary lines around it carry no traceback)
    for (label, expect), (_, out) in zip(labels, results):
        assert sum(expect in ln for ln in out.splitlines()) == 1, f"{label}: cause not on exactly one line:\n{out}"
    assert not golden.exists() or not any(golden.rglob("manifest.json")), "a golden was built before refusing"


def test_a_fifo_probe_through_the_harness_script(base: Path, tmp_path: Path):
    """A reported probe through the installed `harness` script itself (the batch above goes through
    the same entry point, harness.cli.main, in one interpreter)."""
    outside = tmp_path / "outside.safetensors"
    shutil.copy(base / "inputs.safetensors", outside)
    runs = []
    for case in (fifo_inputs,):
        d = tmp_path / case.__name__
        shutil.copytree(base, d)
        runs.append((case.__name__, case(d, outside), _gate(["--trace", str(d)], tmp_path / "golden")))
    deadline = time.monotonic() + TIMEOUT
    results = [(name, expect, *_finish(proc, max(1.0, deadline - time.monotonic()))) for name, expect, proc in runs]
    failures = [p for name, expect, code, text in results if (p := _problem(name, expect, code, text))]
    assert not failures, "\n".join(failures)


def test_checkpoint_given_with_weights_must_be_regular_files(tmp_path: Path):
    """--weights folders may live anywhere (symlinks allowed, as in the HF cache) but a FIFO shard is
    refused by name instead of blocking the build."""
    from harness.errors import HarnessError
    from harness.weights.checkpoint import checkpoint_digest, load_checkpoint

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(SPEC.config))
    os.mkfifo(ckpt / "model.safetensors")
    for fn in (load_checkpoint, lambda spec, p: checkpoint_digest(p)):
        with pytest.raises(HarnessError, match="model.safetensors is a FIFO, not a regular file"):
            fn(SPEC, ckpt)
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "config.json.fifo")
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(ckpt / "config.json.fifo")
    with pytest.raises(HarnessError, match="config.json is a FIFO"):
        load_checkpoint(SPEC, ckpt)
