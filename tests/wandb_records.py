"""Read the history of an offline W&B run (``run-*.wandb``) without a W&B server.

The file is a LevelDB-style log (header ``:W&B`` + magic + version, then 32 KiB blocks of records with a
7-byte header: crc32c, length, type) whose payloads are ``wandb_internal_pb2.Record`` protobufs. wandb
0.31 no longer ships a Python reader, so this minimal one (checksums not verified) serves the tests.
"""

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            chunks = [payload]
        elif kind == FIRST:
            chunks = [payload]
            continue
        elif kind == MIDDLE:
            chunks.append(payload)
            continue
        elif kind == LAST:
            chunks.append(payload)
        record = pb.Record()
        record.ParseFromString(b"".join(chunks))
        yield record


def history(path: Path) -> list[dict[str, str]]:
    """Every logged history row as ``{key: json value}``."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({it.key or "/".join(it.nested_key): it.value_json for it in r.history.item})
    return rows


if __name__ == "__main__":
    import sys

    rows = history(Path(sys.argv[1]))
    keys = sorted({k for row in rows for k in row if not k.startswith("_")})
    print(f"{len(rows)} history rows; keys: {keys}")
