"""FSDP2 and tensor parallel with Any4Tensor weights on 2 CPU ranks (gloo): uneven row sharding,
forward equality, all-gather volume of the packed form, Megatron-style TP of a Llama block, and
QLoRA-style training of peft adapters on a sharded any4 base. One 2-process job runs every check (process start-up dominates); the tests assert."""

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
    ),
]
WORLD = 2


def _worker(rank, init_file, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    import any4ao.testing.distributed_checks as checks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        record = checks.gathered_bytes_recorder()
        results = {"forward": checks.fsdp_forward_matches_unsharded(mesh, "cpu")}
        results["tp"] = checks.tensor_parallel_matches_unsharded(mesh, "cpu")
        results["mixed_precision"] = checks.fsdp_mixed_precision_matches_a_cast_model(mesh, "cpu")
        if record is not None:
            results["volume"] = checks.fsdp_all_gather_volume(mesh, "cpu", record)
        try:
            import peft  # noqa: F401
        except ImportError:
            pass
        else:
            results["qlora"] = checks.qlora_with_fsdp(mesh, "cpu")
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(str(Path(tmp) / "init"), tmp), nprocs=WORLD, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]


def test_fsdp2_uneven_row_shards_give_the_unsharded_output(results):
    assert [r["forward"]["local_rows"] for r in results] == [81, 80]  # 161 rows over 2 ranks
    for r in results:
        assert r["forward"]["local_type"] == "Any4Tensor"
        assert r["forward"]["max_diff_first"] == 0.0 and r["forward"]["max_diff_second"] == 0.0


def test_fsdp2_all_gathers_the_packed_form_at_about_4_3_bits_per_weight(results):
    if "volume" not in results[0]:
        pytest.skip("this torch has no FSDP2 DefaultAllGather to count bytes with")
    for r in results:
        v = r["volume"]
        assert v["max_diff"] == 0.0
        assert v["gathered_bytes"] == v["expected_bytes"]  # codes + LUT + scales + zeros, padded rows
        bits = 8 * v["gathered_bytes"] / v["weights"]
        assert 4.3 < bits < 4.4, bits  # 4.31 for group 128 in bf16, plus one padding row of 97
        assert v["gathered_bytes"] < 0.28 * v["bf16_bytes"]


def test_qlora_adapters_train_on_a_sharded_any4_base(results):
    if "qlora" not in results[0]:
        pytest.skip("peft is not installed")
    for r in results:
        q = r["qlora"]
        assert q["base_is_any4"] and q["base_unchanged"]
        assert q["losses"][-1] < 0.9 * q["losses"][0], q["losses"]
    assert results[0]["qlora"]["losses"] == pytest.approx(results[1]["qlora"]["losses"])  # same data, same model


def test_tensor_parallel_column_and_row_wise_match_unsharded(results):
    for r in results:
        tp = r["tp"]
        assert tp["q_local"] == (32, 64) and tp["down_local"] == (64, 64) and tp["local_type"] == "Any4Tensor"
        assert tp["max_diff"] <= 1e-5 * tp["scale"]  # row-wise TP sums partial products in another order


def test_row_wise_split_must_keep_whole_groups():
    from any4ao import Any4Tensor

    w = Any4Tensor.from_hp(torch.randn(8, 160), group_size=32, kmeans_iterations=1)
    assert [c.shape[1] for c in torch.chunk(w, 5, dim=1)] == [32] * 5  # 32 = one group per shard
    with pytest.raises(ValueError, match="whole quantization groups"):
        torch.chunk(w, 2, dim=1)  # 80 columns = 2.5 groups


def test_fsdp2_mixed_precision_casts_the_gathered_parts_like_a_cast_model(results):
    for r in results:
        mp = r["mixed_precision"]
        assert mp["dtype"] == "torch.bfloat16"
        assert mp["max_diff_first"] == 0.0 and mp["max_diff_second"] == 0.0, mp
