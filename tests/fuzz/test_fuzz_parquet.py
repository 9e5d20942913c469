"""Fuzzing ParquetSource: tables with right, wrong, nested and null image columns, odd keys
and hints, written with tiny pages and row groups, and then corrupted; every row is a sample
or a quarantined sample, and a well-formed file is never reported as corrupt."""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzz.strategies import byte_op, parquet_tables  # noqa: E402
from fuzz.targets import (  # noqa: E402
    _tiny_images,
    apply_ops,
    check_parquet,
    parquet_bytes,
    parquet_seed_tables,
)

SCALE = float(os.environ.get("VEIL_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=int(200 * SCALE), deadline=None, derandomize=True,
                database=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("name", sorted(parquet_seed_tables()))
def test_seed_tables_are_read_row_by_row(name):
    table = parquet_seed_tables()[name]
    check_parquet(parquet_bytes(table), expected=table)


def test_parquet_source_survives_odd_and_corrupted_files():
    images = list(_tiny_images().values())

    @FUZZ
    @given(parquet_tables(images), st.lists(byte_op, max_size=2))
    def run(table_options, ops):
        table, options = table_options
        original = parquet_bytes(table, **options)
        data = apply_ops(original, ops)
        intact = data == original
        check_parquet(data, mutated=not intact, expected=table if intact else None)

    run()


@pytest.mark.parametrize("name", ["struct-bytes-string", "struct-bytes-int",
                                  "struct-bytes-nested"])
def test_struct_image_column_without_binary_bytes_quarantines_rows_not_the_shard(name):
    """Fuzzing found that a struct image column whose "bytes" field is a string, a number or
    a struct failed on the first row and was reported as a corrupt shard, hiding the other
    rows; every row is now quarantined with the column's type."""
    table = parquet_seed_tables()[name]
    assert check_parquet(parquet_bytes(table), expected=table) == "unsupported_image_column"
