"""Hypothesis strategies over the mutations and structured inputs of ``fuzz.targets``."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from fuzz.targets import (
    INTERESTING_DIMS,
    INTERESTING_INTS,
    PAYLOADS,
    PNG_CHUNK_TYPES,
    TAR_FIELD_VALUES,
    config_field_paths,
    nest,
)

positions = st.integers(min_value=0, max_value=1 << 20)
dims = st.sampled_from(INTERESTING_DIMS) | st.integers(min_value=0, max_value=(1 << 32) - 1)

byte_op = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("set"), positions, st.integers(0, 255)),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), positions, st.integers(1, 512)),
    st.tuples(st.just("dup"), positions, st.integers(1, 512)),
    st.tuples(st.just("splice"), positions, st.integers(0, 63), positions),
    st.tuples(st.just("int"), positions, st.sampled_from([1, 2, 4]),
              st.sampled_from(INTERESTING_INTS) | st.integers(0, (1 << 32) - 1), st.booleans()),
)
image_op = byte_op | st.tuples(st.just("dims"), dims, dims) | st.tuples(
    st.just("png_chunk"), st.sampled_from(PNG_CHUNK_TYPES),
    st.sampled_from(sorted(PAYLOADS)) | st.binary(max_size=64), st.integers(0, 16))

IMAGE_EXTS = (None, "jpg", "png", "webp", "tif", "bmp", "gif")


@st.composite
def mutated_images(draw: Any, seeds: dict[str, tuple[bytes, str]]) -> tuple[str, list, str | None]:
    """(seed name, ops, extension): usually the seed's own extension, sometimes another."""
    name = draw(st.sampled_from(sorted(seeds)))
    ops = draw(st.lists(image_op, min_size=1, max_size=4))
    ext = draw(st.just(seeds[name][1]) | st.sampled_from(IMAGE_EXTS))
    return name, ops, ext


tar_field_op = st.sampled_from(sorted(TAR_FIELD_VALUES)).flatmap(
    lambda field: st.tuples(st.just("field"), st.integers(0, 31), st.just(field),
                            st.sampled_from(TAR_FIELD_VALUES[field]) | st.binary(max_size=16),
                            st.booleans()))
tar_op = tar_field_op | byte_op


@st.composite
def mutated_tars(draw: Any, seeds: dict[str, bytes]) -> tuple[str, list, bool]:
    name = draw(st.sampled_from(sorted(seeds)))
    ops = draw(st.lists(tar_op, min_size=1, max_size=3))
    return name, ops, draw(st.booleans())


# Parquet --------------------------------------------------------------------------------------


@st.composite
def parquet_tables(draw: Any, images: list[bytes]) -> tuple[Any, dict[str, Any]]:
    """A table with an image column of a right or wrong type, odd keys and hints, plus the
    writer options (tiny pages and row groups, dictionary encoding, compression)."""
    import pyarrow as pa

    n = draw(st.integers(0, 12))
    blob = st.sampled_from(images) | st.binary(max_size=48)
    kind = draw(st.sampled_from(["binary", "large_binary", "struct", "struct-large",
                                 "struct-string", "string", "int", "list", "null"]))
    null = st.none()
    if kind in ("binary", "large_binary"):
        values = draw(st.lists(blob | null, min_size=n, max_size=n))
        column = pa.array(values, pa.binary() if kind == "binary" else pa.large_binary())
    elif kind.startswith("struct"):
        inner = {"struct": pa.binary(), "struct-large": pa.large_binary(),
                 "struct-string": pa.string()}[kind]
        value = st.text(max_size=8) if kind == "struct-string" else blob
        entry = st.fixed_dictionaries({"bytes": value | null,
                                       "path": st.sampled_from(["a.jpg", "b.PNG", "", "x"]) | null})
        values = draw(st.lists(entry | null, min_size=n, max_size=n))
        column = pa.array(values, pa.struct([("bytes", inner), ("path", pa.string())]))
    elif kind == "string":
        column = pa.array(draw(st.lists(st.text(max_size=8) | null, min_size=n, max_size=n)))
    elif kind == "int":
        column = pa.array(draw(st.lists(st.integers(-5, 5) | null, min_size=n, max_size=n)),
                          pa.int64())
    elif kind == "list":
        column = pa.array(draw(st.lists(st.lists(blob, max_size=2) | null, min_size=n,
                                        max_size=n)), pa.list_(pa.binary()))
    else:
        column = pa.nulls(n)
    columns: dict[str, Any] = {"image": column}
    key_name = draw(st.sampled_from([None, "__key__", "key"]))
    if key_name:
        key = draw(st.sampled_from([st.text(max_size=3) | null, st.integers(0, 2) | null,
                                    st.binary(max_size=2) | null,
                                    st.floats(allow_nan=True) | null]))
        columns[key_name] = pa.array(draw(st.lists(key, min_size=n, max_size=n)))
    for hint in draw(st.sets(st.sampled_from(["path", "format", "ext"]))):
        columns[hint] = pa.array(draw(st.lists(
            st.sampled_from(["a.jpg", "JPEG", ".png", "tif", "", "a.", "gif"]) | null,
            min_size=n, max_size=n)), pa.string())
    table = pa.table(columns)
    options = {
        "compression": draw(st.sampled_from(["snappy", "none", "zstd", "gzip"])),
        "use_dictionary": draw(st.booleans()),
        "row_group_size": draw(st.sampled_from([None, 1, 3])),
        "data_page_size": draw(st.sampled_from([None, 64])),
    }
    return table, {k: v for k, v in options.items() if v is not None}


# Run configuration ------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(1 << 40), 1 << 40)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12)
           | st.sampled_from(["blur", "fsap", "centerface", "mtcnn,yunet", "0,90", "90,x",
                              "ray", "local", "cpu", "cuda", "ellipse", "quarantine", "1e3",
                              "", " ", "taef2", "dlib-resnet", "mobilefacenet"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
#: Values near the right type: boundaries of the numeric ranges the sections check.
near_values = (st.sampled_from([0, 1, -1, 2, 3, 4, 8, 16, 64, 100, 255, 256, 10_000, 10_001,
                                0.5, 0.0, 1.0, -0.2, 1e-9, 2.0, float("inf"), float("nan"),
                                True, False, None, [], [0], [90, 180], [1, 2, 3], [0, 0, 256],
                                ["centerface"], ["dlib-resnet"], {"a": "b"}, "0,90,180"])
               | st.lists(st.integers(-1, 300), max_size=4))
FIELD_PATHS = sorted(config_field_paths())
SECTIONS = ("detect", "anonymize", "fsap", "rescan", "io")


@st.composite
def config_dicts(draw: Any) -> dict[str, Any]:
    flat = draw(st.dictionaries(st.sampled_from(FIELD_PATHS), near_values | values, max_size=6))
    data = nest(flat)
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.text(max_size=8))] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.sampled_from(SECTIONS))] = draw(values)
    return data


yaml_texts = st.one_of(
    st.text(alphabet=st.sampled_from(list("abcdefg:-[]{},'\"!&*#|>%@` \n\t0123456789.")),
            max_size=60).map(str.encode),
    st.binary(max_size=60),
    st.sampled_from([b"detect: {max_side: !!python/object:os.system x}\n", b"a: &x [*x]\n",
                     b"io:\n  max_pixels: 1e9\n", b"\xff\xfe\x00d", b"--- 1\n--- 2\n",
                     b"detect:\n  detectors: [centerface\n", b"? [a]\n: 1\n", b"runner: [ray]\n",
                     b"seed: 0x10\nbatch_size: 0o20\n", b"fsap: ~\n", b"detect: null\n"]),
)
