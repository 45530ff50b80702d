"""Conversion speed and memory on a synthetic checkpoint with a real OPT shape (default opt-1.3b,
fp16, about 2.6 GB), next to a plain file copy of the same bytes in the same run.

    .venv/bin/python benchmarks/bench_convert.py [--preset opt-1.3b] [--workdir /tmp/opt-bench-convert]
                                                 [--json benchmarks/results/bench_convert.json]

Measured, each in its own subprocess (peak RSS = that process's VmHWM, imports included):
  copy                      plain copy of the source safetensors bytes (read + write + fsync)
  safetensors->safetensors  resharded (source 1 GB shards -> 500 MB shards)
  safetensors->tf-h5
  safetensors->flax-msgpack
  metaseq(2 parts)->safetensors
Targets: peak RSS <= 2 x largest tensor + 300 MB for streaming paths; throughput >= 50%
of the plain copy. The synthetic files are generated tensor by tensor into --workdir and deleted
at the end (--keep to keep them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1e6


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_now() -> int:
    return _status("VmRSS")


def _peak_rss() -> int:
    """This process's resident high-water mark. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a
    child forked from a large parent would report the parent's size."""
    return _status("VmHWM")


# ---------------------------------------------------------------- children (one measurement each)
def child(spec: dict) -> dict:
    if spec["kind"] == "copy":
        base = _rss_now()
        t0 = time.perf_counter()
        out = Path(spec["dst"])
        out.mkdir(parents=True)
        for f in sorted(Path(spec["src"]).iterdir()):
            with open(f, "rb") as fi, open(out / f.name, "wb") as fo:
                shutil.copyfileobj(fi, fo, 16 * 1024 * 1024)
                fo.flush()
                os.fsync(fo.fileno())
        wall = time.perf_counter() - t0
    else:
        if spec["src_format"] in ("metaseq", "bin") or spec["to"] == "bin":
            import torch  # noqa: F401  (part of the cost of reading metaseq; imported before the baseline)
        from conversion import convert

        base = _rss_now()
        t0 = time.perf_counter()
        convert(spec["src"], spec["dst"], to=spec["to"], shard_size=spec.get("shard_size"), progress=False,
                src_format=spec["src_format"])
        wall = time.perf_counter() - t0
    peak = _peak_rss()
    return {"wall_s": wall, "peak_rss": peak, "baseline_rss": base}


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------- synthetic checkpoints
def make_safetensors(folder: Path, preset: str, shard: str) -> tuple[object, int]:
    """Random fp16 weights with the preset's shapes, streamed into 1 GB safetensors shards."""
    import numpy as np

    from opt_core import OPTConfig
    from opt_core.checkpoint import parse_size
    from opt_core.formats import TensorPlan
    from opt_core.formats.safetensors import SafetensorsWriter
    from opt_core.params import Head, hf_name, parameter_table

    config = OPTConfig.from_preset(preset)
    plan = [TensorPlan(s, hf_name(s.name, Head.CAUSAL_LM), np.dtype(np.float16))
            for s in parameter_table(config) if s.tied_to is None]
    folder.mkdir(parents=True)
    writer = SafetensorsWriter(folder, plan, config, Head.CAUSAL_LM, parse_size(shard))
    rng = np.random.default_rng(0)
    for p in plan:
        arr = (0.02 * rng.standard_normal(p.spec.shape, dtype=np.float32)).astype(np.float16)
        writer.write(p.spec.name, arr)
        del arr
    writer.commit()
    d = config.to_dict()
    d["architectures"] = ["OPTForCausalLM"]
    d["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    return config, max(p.nbytes for p in plan)


def make_metaseq(src: Path, folder: Path, config, parts: int = 2) -> None:
    """The same weights in metaseq's layout (fused K,V,Q per part, Megatron splits), one part in
    memory at a time."""
    import numpy as np
    import torch

    from opt_core.formats.metaseq import split_axis
    from opt_core.formats.safetensors import SafetensorsReader
    from opt_core.layout import split_model_parallel, split_qkv_model_parallel

    folder.mkdir(parents=True)
    reader = SafetensorsReader(src)
    keys = {k.removeprefix("model."): k for k in reader.shapes()}
    for p in range(parts):
        sd: dict[str, torch.Tensor] = {}
        done = set()
        for name, key in keys.items():
            if name in done:
                continue
            if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
                stem, leaf = name.rsplit(".", 1)
                base = stem.rsplit(".", 1)[0]
                q, k, v = (reader.read(keys[f"{base}.{x}_proj.{leaf}"]) for x in "qkv")
                sd[f"{base}.qkv_proj.{leaf}"] = torch.from_numpy(split_qkv_model_parallel(q, k, v, parts)[p])
                done |= {f"{base}.{x}_proj.{leaf}" for x in "qkv"}
                continue
            arr = reader.read(key)
            axis = split_axis(name)
            if axis is not None:
                arr = split_model_parallel(arr, parts, axis)[p]
            mname = {"decoder.final_layer_norm.weight": "decoder.layer_norm.weight",
                     "decoder.final_layer_norm.bias": "decoder.layer_norm.bias"}.get(name, name)
            sd[mname] = torch.from_numpy(np.ascontiguousarray(arr))
        sd["decoder.version"] = torch.tensor([3.0])
        cfg = {"model": {"decoder_embed_dim": config.hidden_size, "decoder_layers": config.num_hidden_layers,
                         "decoder_attention_heads": config.num_attention_heads,
                         "decoder_ffn_embed_dim": config.ffn_dim, "decoder_normalize_before": True,
                         "max_target_positions": config.max_position_embeddings, "activation_fn": "relu"}}
        torch.save({"model": sd, "cfg": cfg}, folder / f"reshard-model_part-{p}.pt")
        del sd
    reader.close()


# ---------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="opt-1.3b")
    ap.add_argument("--workdir", default="/tmp/opt-bench-convert")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "bench_convert.json"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints in --workdir")
    ap.add_argument("--reuse", action="store_true", help="reuse synthetic checkpoints kept by an earlier --keep run")  # noqa: E501
    ap.add_argument("--cases", default=None, help="comma-separated substrings: only matching cases (copy always runs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    work = Path(args.workdir)
    done_marker = work / f"done-{args.preset}"
    reuse = args.reuse and done_marker.is_file()
    if work.exists() and not reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if reuse:
            from opt_core import OPTConfig

            config = OPTConfig.from_pretrained(work / "src")
            largest = 2 * config.vocab_size * config.embed_dim
        else:
            config, largest = make_safetensors(work / "src", args.preset, "1GB")
            make_metaseq(work / "src", work / "metaseq", config)
            done_marker.write_text("ok")
        gen_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (work / "src").glob("*.safetensors"))
        bound = 2 * largest + 300 * 1024**2
        print(f"{args.preset} fp16: {size / 1e9:.2f} GB, largest tensor {largest / MB:.0f} MB, "
              f"RSS bound 2 x largest + 300 MiB = {bound / MB:.0f} MB (generated in {gen_s:.0f} s)", flush=True)
        cases = [
            ("copy", {"kind": "copy", "src": str(work / "src")}),
            ("safetensors->safetensors (1GB -> 500MB shards)",
             {"kind": "convert", "src": str(work / "src"), "src_format": "safetensors", "to": "safetensors",
              "shard_size": "500MB"}),
            ("safetensors->tf-h5", {"kind": "convert", "src": str(work / "src"), "src_format": "safetensors",
                                    "to": "tf-h5"}),
            ("safetensors->flax-msgpack", {"kind": "convert", "src": str(work / "src"),
                                           "src_format": "safetensors", "to": "flax-msgpack"}),
            ("metaseq(2 parts)->safetensors", {"kind": "convert", "src": str(work / "metaseq"),
                                                "src_format": "metaseq", "to": "safetensors"}),
            ("safetensors->bin", {"kind": "convert", "src": str(work / "src"), "src_format": "safetensors",
                                  "to": "bin"}),
            # reading the other formats back (no target; for information)
            ("tf-h5->safetensors", {"kind": "convert", "src": str(work / "h5"), "src_format": "tf-h5",
                                    "to": "safetensors"}),
            ("flax-msgpack->safetensors", {"kind": "convert", "src": str(work / "msgpack"),
                                           "src_format": "flax-msgpack", "to": "safetensors"}),
            ("bin->safetensors", {"kind": "convert", "src": str(work / "bin"), "src_format": "bin",
                                  "to": "safetensors"}),
        ]
        keep_as = {"safetensors->tf-h5": "h5", "safetensors->flax-msgpack": "msgpack", "safetensors->bin": "bin"}
        if args.cases:
            wanted = [c.strip() for c in args.cases.split(",")]
            cases = [c for c in cases if c[0] == "copy" or any(w in c[0] for w in wanted)]
        names = {n for n, _ in cases}
        producer = {str(work / short): case for case, short in keep_as.items()}  # read-back input -> its writer
        cases = [c for c in cases if producer.get(c[1]["src"], c[0]) in names | {c[0]}
                 and (c[1]["src"] not in producer or producer[c[1]["src"]] in names)]
        if (work / "out").exists():
            shutil.rmtree(work / "out")
        cases.append(("copy (again, last)", dict(cases[0][1])))  # the machine is shared: bracket the run
        rows = []
        for name, spec in cases:
            spec["dst"] = str(work / "out")
            res = run_child(spec)
            written = dir_bytes(work / "out")
            if name in keep_as:  # input of a later read-back case
                shutil.rmtree(work / keep_as[name], ignore_errors=True)
                os.replace(work / "out", work / keep_as[name])
            else:
                shutil.rmtree(work / "out")
            tp = size / res["wall_s"]
            row = {"case": name, "wall_s": round(res["wall_s"], 2), "throughput_MBps": round(tp / MB, 1),
                   "peak_rss_MB": round(res["peak_rss"] / MB),
                   "baseline_rss_MB": round(res["baseline_rss"] / MB), "written_GB": round(written / 1e9, 3),
                   "rss_within_bound": res["peak_rss"] <= bound}
            rows.append(row)
            print(f"  {name:<48} {row['wall_s']:>7.1f} s {row['throughput_MBps']:>7.0f} MB/s "
                  f"peak RSS {row['peak_rss_MB']:>5} MB (after imports {row['baseline_rss_MB']} MB)", flush=True)
        copies = [r["throughput_MBps"] for r in rows if r["case"].startswith("copy")]
        copy_tp = sum(copies) / len(copies)  # mean of the copy before and after the conversions
        for r in rows:
            r["vs_copy"] = round(r["throughput_MBps"] / copy_tp, 2)
            extra = r["case"] in ("safetensors->bin", "tf-h5->safetensors", "flax-msgpack->safetensors",
                                  "bin->safetensors")
            r["target"] = ("baseline" if r["case"].startswith("copy") else
                           "extra, no target" if extra else ">= 0.5x copy, RSS <= bound")
        result = {
            "preset": args.preset, "dtype": "float16", "source_bytes": size, "largest_tensor_bytes": largest,
            "rss_bound_bytes": bound, "copy_MBps_mean": round(copy_tp, 1), "rows": rows,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_at_end": os.getloadavg()},
            "note": "shared 2-core machine with other jobs running; files in the page cache; "
                    "safetensors outputs and the copy fsync, tf-h5/msgpack writers do not",
        }
        print()
        print(f"vs copy = throughput / mean of the two plain copies ({copy_tp:.0f} MB/s)")
        print("| case | wall s | MB/s | vs copy | peak RSS MB | RSS <= bound | target |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['wall_s']} | {r['throughput_MBps']} | {r['vs_copy']} | {r['peak_rss_MB']} | "
                  f"{'yes' if r['rss_within_bound'] else 'no'} | {r['target']} |")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
