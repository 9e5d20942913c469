"""Planning a run of 100,000 shards: listing, fingerprints and the resume check stay cheap.

No shard file exists: a brace pattern is expanded without touching storage, and the resume
check lists the output's manifest folder once instead of asking about every shard. The
time it takes is measured by ``benchmarks/bench_plan.py``; here, what it does and the memory
it needs.
"""

from __future__ import annotations

import tracemalloc

N_SHARDS = 100_000


def test_planning_100k_shards_lists_once_and_skips_finished(tmp_path, monkeypatch):
    from veil.pipelines import manifest as manifest_module
    from veil.pipelines.driver import shards_to_do
    from veil.pipelines.execution import shard_fingerprint
    from veil.pipelines.manifest import write_manifest
    from veil.pipelines.sources import open_source
    from veil.pipelines.storage import as_store

    fingerprint = "f" * 64
    out = as_store(tmp_path / "out")
    done_ids = ["shard-000007.tar", "shard-050000.tar", "shard-099999.tar"]
    for shard_id in done_ids:
        out.write_bytes(f"data/{shard_id}", b"released")
        write_manifest(out, shard_id, [], run_fingerprint=fingerprint,
                       extra={"outputs": f"data/{shard_id}"})
    # A manifest from another configuration is listed but not trusted.
    write_manifest(out, "shard-000008.tar", [], run_fingerprint="0" * 64, extra={"outputs": ""})

    checked: list[str] = []
    real_check = manifest_module.is_shard_complete

    def counting_check(root, shard_id, fp):
        checked.append(shard_id)
        return real_check(root, shard_id, fp)

    monkeypatch.setattr(manifest_module, "is_shard_complete", counting_check)

    tracemalloc.start()
    try:
        source = open_source(str(tmp_path / "raw" / "shard-{000000..099999}.tar"))
        shards = source.list_shards()
        todo = shards_to_do(shards, out, fingerprint)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert len(shards) == N_SHARDS
    assert shard_fingerprint(fingerprint, shards[0]) == fingerprint  # tar ids are the identity
    assert len(todo) == N_SHARDS - len(done_ids)
    assert not {s.id for s in todo} & set(done_ids)
    assert todo[0].id == "shard-000000.tar" and todo[-1].id == "shard-099998.tar"  # input order
    # Only the shards with a manifest are looked at, not all 100,000.
    assert sorted(checked) == sorted([*done_ids, "shard-000008.tar"])
    # A few hundred bytes per shard: the plan is a list of shard records, nothing more.
    assert peak < 150 * 2**20, f"planning held {peak / 2**20:.0f} MiB"
