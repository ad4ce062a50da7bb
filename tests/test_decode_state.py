"""The fast engine's decode state, each record alone: the KV cache, the per-row device state, one
wave's bookkeeping."""

import torch

from posttrain.engine import SamplingParams
from posttrain.engine.decode_state import KVCache, Rows, StepSpec, Wave


def test_kv_cache_allocates_fits_and_compacts_every_layer():
    kv = KVCache.allocate(layers=3, rows=4, kv_heads=2, max_len=8, head_dim=5, dtype=torch.float32, device="cpu")
    assert len(kv.flat) == 6 and all(c.shape == (4, 2, 8, 5) for c in kv.flat)
    assert len({c.data_ptr() for c in kv.flat}) == 6  # a K and a V per layer, none shared
    assert (kv.rows, kv.max_len) == (4, 8)
    assert kv.fits(4, 8) and kv.fits(2, 3) and not kv.fits(5, 8) and not kv.fits(4, 9)
    for i, c in enumerate(kv.flat):
        c.copy_((torch.arange(4) + 10 * i).float()[:, None, None, None].expand_as(c))
    kv.compact(torch.tensor([3, 1]))
    for i, c in enumerate(kv.flat):  # rows 3 and 1 moved to the front, in every cache
        assert c[:, 0, 0, 0].tolist() == [3 + 10 * i, 1 + 10 * i, 2 + 10 * i, 3 + 10 * i]


def test_rows_start_snapshot_and_compact():
    rows = Rows.allocate(6, "cpu")
    eos = torch.tensor([7, 9])
    rows.start(torch.tensor([4, 9, 5, 7]), torch.tensor([10, 11, 12, 13]), eos, pad=0)
    assert rows.tokens.tolist() == [4, 9, 5, 7, 0, 0]
    assert rows.pos.tolist() == [10, 11, 12, 13, 0, 0]
    assert rows.done.tolist() == [False, True, False, True, True, True]  # a first token that is EOS finishes its row
    assert rows.arange.tolist() == list(range(6))
    rows.start(torch.tensor([7, 5]), torch.tensor([3, 4]), torch.zeros(0, dtype=torch.long), pad=1)  # EOS ignored
    assert rows.done.tolist() == [False, False, True, True, True, True] and rows.tokens.tolist() == [7, 5, 1, 1, 1, 1]

    snap = rows.snapshot(2)
    rows.tokens[:2] = 99
    rows.pos[:2] += 5
    rows.done[:2] = True
    rows.restore(snap, 2)
    assert rows.tokens[:2].tolist() == [7, 5] and rows.pos[:2].tolist() == [3, 4] and not rows.done[:2].any()

    rows.start(torch.tensor([1, 2, 3, 4]), torch.tensor([10, 20, 30, 40]), torch.zeros(0, dtype=torch.long), pad=0)
    rows.next[:4] = torch.tensor([5, 6, 7, 8])
    rows.compact(torch.tensor([2, 0]))
    assert rows.tokens[:2].tolist() == [3, 1] and rows.pos[:2].tolist() == [30, 10]
    assert rows.done.tolist() == [False, False, True, True, True, True]  # the slots after the kept rows are finished,
    assert rows.pos[2:].tolist() == [0, 0, 0, 0]  # at position 0: their attention reads one token
    assert rows.next[:4].tolist() == [5, 6, 7, 8]  # outputs are not state: the next step rewrites them


def test_step_spec_names_what_the_graphs_bake_in():
    a = StepSpec(SamplingParams(temperature=0.7, top_p=0.9), torch.tensor([2]), pad=0, max_pos=63)
    b = StepSpec(SamplingParams(temperature=0.7, top_p=0.9, ignore_eos=True), torch.zeros(0, dtype=torch.long), pad=0, max_pos=63)
    assert a.graph_key == (0.7, 0.9, False) and b.graph_key == (0.7, 0.9, True)


def test_wave_records_live_rows_and_compacts():
    first, first_lp = torch.tensor([11, 12, 13]), torch.tensor([-0.1, -0.2, -0.3])
    wave = Wave.start(first, first_lp, lens=torch.tensor([5, 9, 7]), steps=4, longest=9)
    assert wave.t == 1 and wave.n_live == 3 and wave.tokens[:, 0].tolist() == [11, 12, 13]
    rows = Rows.allocate(4, "cpu")
    rows.next[:3], rows.logp[:3] = torch.tensor([21, 22, 23]), torch.tensor([-1.0, -2.0, -3.0])
    wave.record(rows)
    assert wave.t == 2 and wave.tokens[:, 1].tolist() == [21, 22, 23] and wave.logps[:, 1].tolist() == [-1.0, -2.0, -3.0]

    wave.compact(torch.tensor([0, 2]))  # original row 1 (the longest prompt) finished
    assert wave.live.tolist() == [0, 2] and wave.n_live == 2 and wave.longest_live == 7
    rows.next[:2] = torch.tensor([31, 33])  # slot 0 holds row 0, slot 1 holds row 2
    wave.record(rows)
    assert wave.tokens.tolist() == [[11, 21, 31, 0], [12, 22, 0, 0], [13, 23, 33, 0]]


def test_wave_stop_hits_are_remembered():
    wave = Wave.start(torch.tensor([1, 2]), torch.zeros(2), lens=torch.tensor([3, 3]), steps=3, longest=3)
    seen = []

    def decode(ids):
        seen.append(list(ids))
        return " ".join(map(str, ids))

    assert wave.stop_hits(decode, ["2"]).tolist() == [False, True]
    rows = Rows.allocate(2, "cpu")
    rows.next[:2] = torch.tensor([5, 6])
    wave.record(rows)
    seen.clear()
    assert wave.stop_hits(decode, ["2"]).tolist() == [False, True]
    assert seen == [[1, 5]]  # a row already stopped is not decoded again
    seen.clear()
    assert wave.stop_hits(decode, ["5"], finished=torch.tensor([True, False])).tolist() == [False, True]
    assert seen == []  # a row finished at EOS is not decoded either: it ends whatever its text holds
