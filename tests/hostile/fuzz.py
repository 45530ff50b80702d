"""The fuzz worker: random mutations of real small files through the JSON, safetensors-header,
msgpack and pickle readers, for a bounded time. Run in its own process by `test_fuzz.py`:

    python -m tests.hostile.fuzz SEED SECONDS OUT_DIR

Each iteration `i` mutates with its own generator, seeded by (SEED, i), so any failure is
reproduced by its seed and iteration alone (the failing file is also saved in OUT_DIR). An outcome
is acceptable when the reader either loads the file (every tensor read) or raises one of the
project's errors (ValueError, CheckpointError among them) whose message names the file, within
`MAX_SECONDS`; the whole run must stay within `MAX_EXTRA_MB` of peak memory over its setup.
Prints one JSON line: iterations per kind, the failures, the peak memory added.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

MAX_SECONDS = 5.0
MAX_EXTRA_MB = 200
ACCEPTED = (ValueError,)  # CheckpointError and every project input error derive from it


def _real_files(root: Path) -> dict[str, tuple[str, bytes]]:
    """kind -> (file name, bytes of a real file of that kind), from the tiny model converted by
    the project's own writers."""
    from conversion import convert
    from tests.conversion.helpers import write_hf_checkpoint
    from tests.hostile.fixtures import TINY

    src = root / "src"
    src.mkdir()
    write_hf_checkpoint(src, TINY)
    sharded = root / "sharded"
    sharded.mkdir()
    write_hf_checkpoint(sharded, TINY, shard_bytes=20_000)
    out = {}
    for fmt, name in (("bin", "pytorch_model.bin"), ("flax-msgpack", "flax_model.msgpack")):
        convert(src, root / fmt, to=fmt, progress=False)
        out[fmt] = (name, (root / fmt / name).read_bytes())
    with zipfile.ZipFile(root / "bin" / "pytorch_model.bin") as z:
        out["pickle"] = ("pytorch_model.bin", z.read("pytorch_model/data.pkl"))
    out["safetensors"] = ("model.safetensors", (src / "model.safetensors").read_bytes())
    out["config-json"] = ("config.json", (src / "config.json").read_bytes())
    index = "model.safetensors.index.json"
    out["index-json"] = (index, (sharded / index).read_bytes())
    return out


_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"[", b"{", b"]", b"\"", b"\\", b"9" * 20, b"-1", b"1e999",
                b"\xc0\x80", b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"[" * 300, b"h\x00" * 50,
                b"\x8a\x08" + b"\xff" * 8, b"}\x94(", b"(\x94", b"\x85\x86\x87"]


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four random edits of `data`: bit flips, interesting bytes written or inserted,
    truncation, a chunk duplicated or removed, a number replaced by a huge one."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        if not buf:
            buf += b"\x00"
        op = int(rng.integers(0, 7))
        at = int(rng.integers(0, len(buf)))
        if op == 0:
            buf[at] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:
            token = _INTERESTING[int(rng.integers(0, len(_INTERESTING)))]
            buf[at : at + len(token)] = token
        elif op == 2:
            token = _INTERESTING[int(rng.integers(0, len(_INTERESTING)))]
            buf[at:at] = token
        elif op == 3:
            del buf[at:]
        elif op == 4:
            n = int(rng.integers(1, 64))
            buf[at:at] = buf[at : at + n]
        elif op == 5:
            del buf[at : at + int(rng.integers(1, 64))]
        else:
            digits = [i for i in range(max(0, at - 200), min(len(buf), at + 200)) if 48 <= buf[i] <= 57]
            if digits:
                i = digits[int(rng.integers(0, len(digits)))]
                buf[i : i + 1] = str(int(rng.choice([2**31, 2**63, 10**30, 2**64 - 1]))).encode()
    return bytes(buf)


def _rezip(original: Path, pickle_bytes: bytes, out: Path) -> None:
    """`original` (a torch zip archive) with its data.pkl replaced by `pickle_bytes`."""
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, pickle_bytes if info.filename.endswith("/data.pkl") else src.read(info))


def _readers() -> dict[str, Callable[[Path], object]]:
    from opt_core import OPTConfig
    from opt_core.formats.files import read_index
    from opt_core.formats.flax_msgpack import FlaxMsgpackReader
    from opt_core.formats.safetensors import SafetensorsReader
    from opt_core.formats.torch_bin import TorchBinReader
    from tests.hostile.fixtures import TINY

    def read_all(reader_class, **kwargs):
        def run(path: Path) -> object:
            with reader_class(path, files=[path], **kwargs) as reader:
                return {key: reader.read(key) for key in reader.shapes()}
        return run

    return {
        "safetensors": read_all(SafetensorsReader),
        "bin": read_all(TorchBinReader),
        "pickle": read_all(TorchBinReader),
        "flax-msgpack": read_all(FlaxMsgpackReader, config=TINY),
        "config-json": OPTConfig.from_json_file,
        "index-json": read_index,
    }


def run(seed: int, seconds: float, out_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        originals = _real_files(root)
        readers = _readers()
        kinds = sorted(originals)
        work = root / "fuzz"
        work.mkdir()
        for kind in kinds:  # the unmutated files load: the oracle of "correct load"
            name, data = originals[kind]
            if kind == "pickle":
                _rezip(root / "bin" / name, data, work / name)
            else:
                (work / name).write_bytes(data)
            readers[kind](work / name)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        counts = dict.fromkeys(kinds, 0)
        failures = []
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds:
            kind = kinds[i % len(kinds)]
            name, data = originals[kind]
            mutated = mutate(data, np.random.default_rng([seed, i]))
            path = work / name
            if kind == "pickle":  # the mutated pickle in an intact archive, so it reaches the unpickler
                _rezip(root / "bin" / name, mutated, path)
            else:
                path.write_bytes(mutated)
            began = time.monotonic()
            problem = None
            try:
                readers[kind](path)
            except ACCEPTED as e:
                if str(path) not in str(e):
                    problem = f"{type(e).__name__} does not name the file: {str(e)[:300]}"
            except BaseException as e:  # anything else is a finding
                problem = f"{type(e).__name__}: {str(e)[:300]}"
            took = time.monotonic() - began
            if took > MAX_SECONDS:
                problem = f"took {took:.1f} s"
            if problem:
                saved = out_dir / f"seed{seed}-iter{i}-{name}"
                shutil.copy(path, saved)
                failures.append({"kind": kind, "iteration": i, "problem": problem, "file": str(saved)})
            counts[kind] += 1
            i += 1
        extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"seed": seed, "iterations": counts, "failures": failures, "extra_mb": extra_mb}


if __name__ == "__main__":
    seed, seconds, out_dir = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    print("FUZZ " + json.dumps(run(seed, seconds, out_dir)))
