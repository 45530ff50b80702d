"""Round trips between every pair of formats are bit-exact, and dtype casts are exact casts."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from conversion import convert
from tests.conversion.helpers import FORMATS, assert_same_tensors, read_canonical, write_hf_checkpoint
from tests.variants import VARIANTS

pytestmark = pytest.mark.torch  # .bin goes through torch.load / torch.save


@pytest.fixture(scope="module", params=["pre_ln", "post_ln_proj", "no_bias", "no_affine_ln", "no_final_ln"])
def per_format(request, tmp_path_factory):
    """The same weights in every format: {format: folder}, plus the config and canonical weights."""
    config = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    weights = write_hf_checkpoint(root / "src", config, seed=3)
    folders = {}
    for fmt in FORMATS:
        folders[fmt] = root / fmt
        convert(root / "src", folders[fmt], to=fmt, progress=False)
    return config, weights, folders, root


def test_every_pair_is_bit_exact(per_format):
    config, weights, folders, root = per_format
    for fmt in FORMATS:  # the first hop
        assert_same_tensors(read_canonical(folders[fmt], fmt, config), weights)
    for a, b in itertools.product(FORMATS, FORMATS):
        out = root / f"{a}-to-{b}"
        report = convert(folders[a], out, to=b, progress=False, verify=True)
        assert report.verify is not None and report.verify.ok, report.summary()
        assert_same_tensors(read_canonical(out, b, config), weights)


def test_sharded_round_trip(tmp_path):
    config = VARIANTS["post_ln_proj"]
    weights = write_hf_checkpoint(tmp_path / "src", config, shard_bytes=30_000)
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    convert(tmp_path / "src", tmp_path / "bin", to="bin", shard_size="20KB", progress=False)
    names = sorted(p.name for p in (tmp_path / "bin").iterdir())
    assert "pytorch_model.bin.index.json" in names, names
    assert len([n for n in names if n.startswith("pytorch_model-")]) > 1, names
    convert(tmp_path / "bin", tmp_path / "st", to="safetensors", shard_size=10_000, progress=False, verify=True)
    assert (tmp_path / "st" / "model.safetensors.index.json").is_file()
    assert_same_tensors(read_canonical(tmp_path / "st"), weights)
    convert(tmp_path / "st", tmp_path / "one", to="safetensors", progress=False)
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert_same_tensors(read_canonical(tmp_path / "one"), weights)


def test_safetensors_output_is_valid_for_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    config = VARIANTS["pre_ln"]
    weights = write_hf_checkpoint(tmp_path / "src", config)
    convert(tmp_path / "src", tmp_path / "out", to="safetensors", shard_size=20_000, progress=False)
    seen = {}
    for f in sorted((tmp_path / "out").glob("model-*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            assert st.metadata() == {"format": "pt"}
            seen.update({k.removeprefix("model."): st.get_tensor(k) for k in st.keys()})
    assert_same_tensors(seen, weights)


@pytest.mark.parametrize("dtype,np_dtype", [("fp16", np.float16), ("bf16", ml_dtypes.bfloat16), ("fp32", np.float32)])
@pytest.mark.parametrize("to", FORMATS)
def test_dtype_cast_is_an_exact_cast(tmp_path, dtype, np_dtype, to):
    config = VARIANTS["pre_ln"]
    weights = write_hf_checkpoint(tmp_path / "src", config)
    report = convert(tmp_path / "src", tmp_path / "out", to=to, dtype=dtype, progress=False, verify=True)
    assert report.verify.ok, report.summary()
    got = read_canonical(tmp_path / "out", to, config)
    assert_same_tensors(got, {k: v.astype(np_dtype) for k, v in weights.items()})
    import json

    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == np.dtype(np_dtype).name
    # and back to fp32: the cast values, widened exactly
    convert(tmp_path / "out", tmp_path / "back", to="safetensors", dtype="fp32", progress=False)
    back = read_canonical(tmp_path / "back")
    assert_same_tensors(back, {k: v.astype(np_dtype).astype(np.float32) for k, v in weights.items()})


def test_both_key_prefix_variants_are_read(tmp_path):
    """Real 350m/6.7b files use `decoder.*` without `model.`; both convert to the same output."""
    from opt_core.checkpoint import save_numpy_safetensors

    config = VARIANTS["post_ln_proj"]
    weights = write_hf_checkpoint(tmp_path / "a", config)
    (tmp_path / "b").mkdir()
    save_numpy_safetensors(tmp_path / "b", weights)  # canonical names = the unprefixed variant
    (tmp_path / "b" / "config.json").write_bytes((tmp_path / "a" / "config.json").read_bytes())
    for name in ("a", "b"):
        convert(tmp_path / name, tmp_path / f"{name}-out", to="flax-msgpack", progress=False)
        assert_same_tensors(read_canonical(tmp_path / f"{name}-out", "flax-msgpack", config), weights)


def test_side_files_are_copied(tmp_path, tokenizer_dir):
    import shutil

    config = VARIANTS["pre_ln"]
    write_hf_checkpoint(tmp_path / "src", config)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir / name, tmp_path / "src" / name)
    (tmp_path / "src" / "generation_config.json").write_text('{"bos_token_id": 2}')
    report = convert(tmp_path / "src", tmp_path / "out", to="tf-h5", progress=False)
    for name in ("config.json", "vocab.json", "merges.txt", "generation_config.json"):
        assert name in report.files
        if name != "config.json":
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def _plain_msgpack(tree: dict, max_chunk: int) -> bytes:
    """Flax's `msgpack_serialize` spelled with msgpack-python's own encoder (sorted keys, Flax's
    chunked form above `max_chunk` bytes): the reference for the zero-copy writer."""
    import msgpack

    def encode(value):
        if isinstance(value, dict):
            return {k: encode(value[k]) for k in sorted(value)}
        if value.nbytes > max_chunk:
            step = max(1, max_chunk // value.dtype.itemsize)
            flat = value.reshape(-1)
            return {"__msgpack_chunked_array__": True,
                    "shape": {str(i): int(d) for i, d in enumerate(value.shape)},
                    "chunks": encode({str(i): flat[s : s + step] for i, s in enumerate(range(0, flat.size, step))})}
        record = (list(value.shape), value.dtype.name, np.ascontiguousarray(value).tobytes())
        return msgpack.ExtType(1, msgpack.packb(record, use_bin_type=True))

    return msgpack.packb(encode(tree), use_bin_type=True)


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_proj", "no_bias", "no_affine_ln"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streaming_msgpack_writer_is_byte_identical_to_plain_msgpack(tmp_path, monkeypatch, variant, dtype):
    """opt_core's zero-copy msgpack writer (as the converter drives it: lazy tensors, C- or
    Fortran-ordered kernels) against msgpack-python's encoding of the same tree, chunked leaves
    included."""
    from opt_core.formats import flax_msgpack as fm
    from opt_core.params import Head, ParamSpec, Role, parameter_table
    from opt_core.reference import random_parameters

    config = VARIANTS[variant]
    params = {k: v.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else v
              for k, v in random_parameters(config, seed=1).items()}
    specs = {s.name: s for s in parameter_table(config)}
    flat = {fm.flax_path(specs[k], Head.CAUSAL_LM): np.ascontiguousarray(v.T) if specs[k].role is Role.LINEAR_WEIGHT
            else v for k, v in params.items() if specs[k].tied_to is None}
    for name, (shape, value) in fm.identity_extras(config).items():
        spec = ParamSpec(name, shape, Role.NORM_WEIGHT if value == 1.0 else Role.LINEAR_BIAS)
        flat[fm.flax_path(spec, Head.CAUSAL_LM)] = np.full(shape, value, dtype=next(iter(params.values())).dtype)
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    for max_chunk in (fm.MAX_CHUNK_BYTES, 1000):  # 1000: force Flax's chunked form on large leaves
        monkeypatch.setattr(fm, "MAX_CHUNK_BYTES", max_chunk)
        ref = tmp_path / f"ref-{max_chunk}.msgpack"
        ref.write_bytes(_plain_msgpack(tree, max_chunk))
        for order in ("C", "F"):  # F: kernels already laid out [in, out] in memory (written without a copy)
            arrays = {k: np.asarray(v, order=order) for k, v in params.items()}
            lazy = {k: (lambda v=v: v) for k, v in arrays.items()}
            ours = fm.write_flax_msgpack(tmp_path / f"ours-{max_chunk}-{order}.msgpack", lazy, config, Head.CAUSAL_LM)
            assert ours.read_bytes() == ref.read_bytes()


def test_fast_transpose_is_numpy_transpose_and_its_own_inverse():
    from opt_core.formats import Scratch, fast_transpose
    from opt_core.layout import transpose

    rng = np.random.default_rng(0)
    scratch = Scratch()
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16, np.float64):
        for shape in ((1, 1), (3, 700), (513, 257), (0, 5)):
            x = rng.standard_normal(shape).astype(dtype)
            t = fast_transpose(x)
            assert t.dtype == x.dtype and t.tobytes() == transpose(x).tobytes()
            back = fast_transpose(t, out=scratch.array(shape, x.dtype))
            assert back.tobytes() == x.tobytes()


@pytest.mark.parametrize("head", ["sequence_classification", "question_answering", "base"])
def test_task_heads_round_trip_through_every_format(tmp_path, head):
    config = VARIANTS["post_ln_proj"]
    weights = write_hf_checkpoint(tmp_path / "src", config, head=head)
    prev = tmp_path / "src"
    for fmt in (*FORMATS, "safetensors"):
        out = tmp_path / f"{fmt}-{len(list(tmp_path.iterdir()))}"
        report = convert(prev, out, to=fmt, progress=False, verify=True)
        assert report.head == head and report.verify.ok, report.summary()
        assert_same_tensors(read_canonical(out, fmt, config, head=head), weights)
        prev = out


def test_untied_lm_head(tmp_path):
    from opt_core.checkpoint import CheckpointError  # noqa: F401  (the error type of the other checks)

    config = VARIANTS["pre_ln"].replace(tie_word_embeddings=False)
    weights = write_hf_checkpoint(tmp_path / "src", config)
    assert "lm_head.weight" in weights
    for fmt in ("bin", "flax-msgpack", "safetensors"):
        convert(tmp_path / "src", tmp_path / fmt, to=fmt, progress=False, verify=True)
        assert_same_tensors(read_canonical(tmp_path / fmt, fmt, config), weights)
    with pytest.raises(ValueError, match="always ties lm_head"):
        convert(tmp_path / "src", tmp_path / "h5", to="tf-h5", progress=False)
    assert not (tmp_path / "h5").exists()
