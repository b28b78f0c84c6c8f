"""Reading an offline W&B run back from its `.wandb` file (wandb's record log: 32 KiB blocks of CRC-checked
chunks holding protobuf `Record`s), so tests can assert what a job logged without any network."""
from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every Record of a `.wandb` file, checksums checked."""
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:HEADER]) == (b":W&B", 0xBEE1, 0), f"{path}: not a version-0 .wandb file"
    records, pos, payload = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if left < HEADER or (length, kind) == (0, 0):  # block trailer / zero padding
            pos += left
            continue
        if pos + HEADER + length > len(data):  # still being written
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += HEADER + length
        payload = chunk if kind in (1, 2) else payload + chunk  # FULL, FIRST start a record; MIDDLE, LAST extend
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(payload))
    return records


def nest(items) -> dict:
    """Config / summary / history items (`key` or `nested_key` path, `value_json`) → a nested dict."""
    out = {}
    for item in items:
        *parents, last = list(item.nested_key) or [item.key]
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = json.loads(item.value_json)
    return out


def read_run(run_dir: Path, timeout: float = 10.0) -> dict:
    """An offline run folder → {"run": RunRecord, "config", "summary", "history": [steps], "files", "exit_code"}.

    Waits for the run's exit record: `run.finish()` returns before wandb-core has written the file to the end."""
    deadline = time.monotonic() + timeout
    while (run := parse_run(run_dir))["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return run


def parse_run(run_dir: Path) -> dict:
    [wandb_file] = run_dir.glob("run-*.wandb")
    run = {"config": {}, "summary": {}, "history": [], "files": [], "exit_code": None}
    for record in read_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["run"] = record.run
            run["config"].update(nest(record.run.config.update))
        elif kind == "config":
            run["config"].update(nest(record.config.update))
        elif kind == "summary":
            run["summary"].update(nest(record.summary.update))
        elif kind == "history":
            run["history"].append(nest(record.history.item))
        elif kind == "files":
            run["files"] += [f.path for f in record.files.files]
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def read_offline_run(job_dir: Path) -> dict:
    """The single offline run logged under a job folder (`wandb/offline-run-*/`), as `read_run` returns it."""
    [run_dir] = Path(job_dir).glob("**/offline-run-*")
    return read_run(run_dir)
