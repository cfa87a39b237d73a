"""Channel searches with garbage collection under 2-process DDP (gloo, CPU): ranks agree, resumes are exact.

One run of ``tests/ddp_search.py`` (two processes, every fit one after the other; the session fixture
``ddp_runs`` of ``tests/conftest.py``) feeds these tests and the DDP tests of growing and SNIP.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from callbacks import FisherPruning, GarbageCollection
from callbacks.distributed import all_reduce_sum, check_strategy, rewrap_ddp
from tests.ddp_search import SUMS_BATCH, SUMS_STEPS, BatchNormEval, data
from tests.helpers import ranks, tiny_module, tiny_trainer


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{what}: {k}")


@pytest.mark.parametrize(
    "fit", ["fisher", "fisher_resumed", "switch", "switch_resumed", "morphnet", "netadapt", "snip_edge"]
)
def test_every_rank_ends_with_the_same_architecture_gates_weights_and_optimizer_state(ddp_runs, fit):
    r0, r1 = ranks(ddp_runs, fit)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["spec"] == r1["spec"]
    assert r0.get("gc_history") == r1.get("gc_history")
    assert_same_tensors(r0["gates"], r1["gates"], "gates")
    assert_same_tensors(r0["state"], r1["state"], "weights")
    assert_same_tensors(r0["optimizer"], r1["optimizer"], "optimizer state")
    assert r0["optimizer"], "the optimizer state was sliced with the weights, not dropped"
    # gated channels were collected: every gate that is left is open
    assert all(bool((g != 0).all()) for g in r0["gates"].values())


def test_fisher_prunes_and_collects_several_times_and_drops_find_unused_after_growth(ddp_runs):
    r0, r1 = ranks(ddp_runs, "fisher")
    assert r0["fisher_history"] == r1["fisher_history"]
    events = len(r0["fisher_history"])
    assert events >= 3 and len(r0["gc_history"]) == events  # a collection right after each event
    assert r0["grow_history"] == [[1, 1], [2, 2], [3, 3]]
    # DDP looked for unused parameters while blocks were inactive, and stopped once the last one grew
    assert r0["find_unused_by_epoch"] == [[e, e < 3] for e in range(6)]


def test_switch_l1_kills_and_collects_identically_on_both_ranks(ddp_runs):
    r0, r1 = ranks(ddp_runs, "switch")
    assert r0["switch_history"] == r1["switch_history"]
    assert r0["restarted"] and r1["restarted"]  # the ranks' identical weights include the fresh ones
    assert len(r0["gc_history"]) >= 2 and r0["gc_history"][-1][1] > 0
    start = {g: len(v) for g, v in ranks(ddp_runs, "sums")[0]["gates"].items()}
    end = r0["switch_history"][-1][1]
    assert sum(end.values()) < sum(start.values())


def test_morphnet_shrinks_collects_and_expands_under_ddp(ddp_runs):
    r0, r1 = ranks(ddp_runs, "morphnet")
    assert r0["expanded"] == r1["expanded"] and [e for e, _ in r0["expanded"]] == [2]
    assert r0["closed"] == r1["closed"] > 0 and r0["gc_history"]
    assert r0["find_unused"] is False  # rebuilt with the strategy's own setting


def test_netadapt_iterates_under_ddp_with_the_same_choice_on_both_ranks(ddp_runs):
    r0, r1 = ranks(ddp_runs, "netadapt")
    assert r0["netadapt_history"] == r1["netadapt_history"]
    assert len(r0["netadapt_history"]) == 4  # 2 iterations in each of epochs 1 and 2
    costs = [c for _, _, c in r0["netadapt_history"]]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == 4


def test_snip_removes_edges_under_ddp_as_each_block_activates(ddp_runs):
    r0, r1 = ranks(ddp_runs, "snip_edge")
    assert r0["snip_history"] == r1["snip_history"]
    assert [row[1] for row in r0["snip_history"]] == [0, 1, 2, 3]  # one event per block
    removed = [c for c in r0["spec"]["cells"] if c.get("reads") is not None]
    assert removed, "the ArchSpec records the edges each cell still reads"
    assert r0["find_unused"] is False  # every block active: DDP stopped looking for unused parameters


def test_a_ddp_resume_after_collections_matches_the_uninterrupted_run(ddp_runs):
    full, resumed = ranks(ddp_runs, "fisher")[0], ranks(ddp_runs, "fisher_resumed")[0]
    stripped = ranks(ddp_runs, "fisher_stripped")[0]
    resume_step = 12
    assert [e for e in full["gc_history"] if e[0] <= 2], "the checkpoint resumed from follows a collection"
    assert resume_step % 5 != 0, "mid-window: the accumulated signal and step count must be restored"
    assert resumed["spec"] == full["spec"]
    assert resumed["fisher_history"] == full["fisher_history"]
    assert_same_tensors(full["state"], resumed["state"], "resumed weights")
    assert_same_tensors(full["optimizer"], resumed["optimizer"], "resumed optimizer state")
    # negative control: the same resume without FisherPruning's state (its half-accumulated window and
    # step count) prunes at other steps and ends elsewhere, so the test above can fail
    later = [h for h in full["fisher_history"] if h[0] > resume_step]
    assert [h[0] for h in stripped["fisher_history"]] != [h[0] for h in later]
    assert stripped["spec"] != full["spec"] or any(
        not torch.equal(full["state"][k], stripped["state"][k]) for k in full["state"]
    )


def test_a_ddp_switch_resume_before_the_freeze_and_the_retraining_matches_the_uninterrupted_run(ddp_runs):
    """The resumed switches come back frozen with the rebuilt net: thawed, DDP rebuilt over them; the
    retraining's seed (none given) is the one drawn when the run started, kept in the checkpoint."""
    full, resumed = ranks(ddp_runs, "switch")[0], ranks(ddp_runs, "switch_resumed")[0]
    assert full["gc_history"] and resumed["restarted"]
    assert resumed["spec"] == full["spec"] and resumed["switch_history"][-1] == full["switch_history"][-1]
    assert_same_tensors(full["state"], resumed["state"], "resumed weights")
    assert_same_tensors(full["optimizer"], resumed["optimizer"], "resumed optimizer state")


def test_fisher_sums_of_two_ranks_equal_one_process_on_the_doubled_batch(ddp_runs, tmp_path):
    """2 ranks x batch B == 1 process x batch 2B: float64, BatchNorm in eval mode (per-sample outputs)."""
    r0, r1 = ranks(ddp_runs, "sums")
    fisher = FisherPruning(every_n_steps=10_000, target_fraction=0.5)
    trainer = tiny_trainer(
        tmp_path,
        callbacks=[fisher, BatchNormEval()],
        precision="64-true",
        max_steps=SUMS_STEPS,
        limit_val_batches=0,
    )
    trainer.fit(tiny_module(seed=0), datamodule=data(2 * SUMS_BATCH, in_order=True))
    one = fisher.state_dict()["accumulator"]
    for acc in (r0["fisher_acc"], r1["fisher_acc"]):
        # every sample of both ranks counted (one rank alone saw half of them)
        assert acc["counts"] == one["counts"] == {g: 2 * SUMS_BATCH * SUMS_STEPS for g in one["counts"]}
        assert acc["sums"].keys() == one["sums"].keys()
        for g, s in one["sums"].items():
            assert s.dtype == torch.float64 and bool((s > 0).any()), g
            # only the order of float64 additions differs (the all-reduce, the batch split): seen <= 1e-15
            torch.testing.assert_close(acc["sums"][g], s, rtol=1e-12, atol=0, msg=g)
    assert_same_tensors(r0["fisher_acc"]["sums"], r1["fisher_acc"]["sums"], "sums on the two ranks")


def test_shape_changing_callbacks_refuse_sharded_strategies_by_name(tmp_path):
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"GarbageCollection changes parameter shapes .* got FSDPStrategy"):
        check_strategy("GarbageCollection", trainer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="FSDP, DeepSpeed and model-parallel strategies"):
        check_strategy("FisherPruning", trainer)  # type: ignore[arg-type]
    check_strategy("GarbageCollection", tiny_trainer(tmp_path))  # one device: fine
    with pytest.raises(
        ValueError, match=r"sync_batchnorm replaces every BatchNorm .* dropping the channel gates"
    ):
        check_strategy("SwitchL1", tiny_trainer(tmp_path, devices=2, strategy="ddp", sync_batchnorm=True))


def test_helpers_do_nothing_on_one_process(tmp_path):
    trainer = tiny_trainer(tmp_path, callbacks=[GarbageCollection()])
    trainer.fit(tiny_module(), datamodule=data())
    assert rewrap_ddp(trainer) is False
    t = torch.arange(3.0)
    assert all_reduce_sum(trainer, [t])[0] is t


def test_a_collective_gathers_its_tensors_onto_the_first_ones_device():
    # NCCL reduces CUDA tensors only: a CPU tensor beside CUDA ones (Fisher's counts) goes where they are
    from callbacks.distributed import _flat, _pieces

    like = [torch.zeros(2, device="meta"), torch.ones(3, dtype=torch.float32)]
    flat = _flat(like)
    assert flat.device.type == "meta" and flat.shape == (5,) and flat.dtype == torch.float64
    assert [p.shape for p in _pieces(flat, like)] == [(2,), (3,)]
