"""Neighbour alignment (``retro_model.alignment``): the window that lines up with the query chunk."""

from __future__ import annotations

import torch

from retro_model.alignment import align_windows, best_shifts, min_bigram_matches
from retro_model.copy_tasks import TASKS, copy_task_config, make_documents, neighbor_windows

M = 16
PAD = 0


def test_every_shift_from_minus_m_to_m_is_found_and_its_window_returned():
    generator = torch.Generator().manual_seed(0)
    documents = torch.randint(1, 500, (2 * M + 1, 1, 4 * M), generator=generator)
    shifts = torch.arange(-M, M + 1)
    queries = torch.stack([documents[i, 0, M + s : 2 * M + s] for i, s in enumerate(shifts.tolist())])
    assert best_shifts(queries[:, None], documents, PAD).squeeze(1).tolist() == shifts.tolist()
    windows = align_windows(queries, documents, PAD)  # (q, 1, 2m)
    for i, s in enumerate(shifts.tolist()):
        assert windows[i, 0].tolist() == documents[i, 0, M + s : 3 * M + s].tolist()


def test_a_partial_copy_aligns_on_its_part_and_unrelated_or_padded_windows_stay():
    generator = torch.Generator().manual_seed(1)
    document = torch.randint(1, 500, (4 * M,), generator=generator)
    query = torch.randint(500, 1000, (M,), generator=generator)  # shares no token with the document
    query[M // 2 :] = document[M + 5 : M + 5 + M // 2]  # its second half is the document from M + 5
    documents = torch.stack([document, torch.randint(1000, 2000, (4 * M,), generator=generator)])[None]
    assert best_shifts(query[None, None], documents, PAD).tolist() == [[5 - M // 2, 0]]
    # fewer matching bigrams than needed: no move
    few = torch.randint(500, 1000, (M,), generator=generator)
    few[-2:] = document[M + 3 : M + 5]  # one bigram
    assert min_bigram_matches(M) == 1 and best_shifts(few[None, None], documents, PAD, 2).tolist() == [[0, 0]]
    # padding matches nothing: an all-padding query and window keep shift 0
    padded = torch.zeros(1, 1, 4 * M, dtype=torch.long)
    assert best_shifts(torch.zeros(1, 1, M, dtype=torch.long), padded, PAD).tolist() == [[0]]


def test_copy_tasks_hold_their_copy_at_an_offset_that_only_alignment_lines_up():
    for name in ("offset", "partial"):
        task = TASKS[name]
        m = task.chunk_len
        tokens, _, documents, _ = make_documents(task, 8, torch.Generator().manual_seed(2))
        windows = {
            alignment: neighbor_windows(
                documents, tokens, copy_task_config(task, neighbor_alignment=alignment)
            )
            for alignment in ("none", "match")
        }
        lined_up = {alignment: 0 for alignment in windows}
        for b in range(8):
            for u in range(task.num_chunks - 1):
                following = tokens[b, (u + 1) * m : (u + 2) * m]
                for alignment, w in windows.items():
                    lined_up[alignment] += any(
                        torch.equal(w[b, u, j, m:], following) for j in range(task.num_neighbors)
                    )
        total = 8 * (task.num_chunks - 1)
        assert lined_up["match"] == total, (name, lined_up)
        assert lined_up["none"] < total // 4, (name, lined_up)  # only the copies at offset 0
