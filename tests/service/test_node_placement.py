"""Where the scheduler puts a train job (app/services/nodes.py): ``gpus`` slots on each of ``nodes`` machines."""

from __future__ import annotations

from app.services.nodes import place

MACHINES = [[0, 1], [2, 3], [4, 5, 6]]


def test_one_part_per_machine_on_the_first_machines_that_have_room() -> None:
    assert place(MACHINES, [0, 1, 2, 3, 4, 5, 6], gpus=1, nodes=2) == [[0], [2]]
    assert place(MACHINES, [1, 2, 3, 4, 5, 6], gpus=2, nodes=2) == [[2, 3], [4, 5]]  # machine 0 has one free
    assert place(MACHINES, [0, 1, 2, 3, 4, 5, 6], gpus=3, nodes=1) == [[4, 5, 6]]
    assert place(MACHINES, [0, 1, 2, 3, 4, 5, 6], gpus=1, nodes=3) == [[0], [2], [4]]


def test_no_placement_when_too_few_machines_have_room() -> None:
    assert place(MACHINES, [0, 2, 3, 4, 5], gpus=2, nodes=3) is None
    assert place(MACHINES, [0, 1, 2, 3, 4, 5, 6], gpus=3, nodes=2) is None
    assert place(MACHINES, [], gpus=1, nodes=1) is None
