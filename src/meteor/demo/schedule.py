"""The demo's steps as a graph of tasks, run on a pool of worker processes.

Each task starts as soon as the tasks it needs are done, and among the tasks ready to start, the one
that heads the longest remaining chain of work goes first (list scheduling by "upward rank", the
HLFET rule): the longest chain (the all-tokens budget's stage 1, stage 2, evaluation) starts at
once, and the short tasks (evaluations) fill the end, so every worker stays busy until the work
runs out. Costs are estimates used for this order only; what a task computes never depends on
where or when it runs.

Each worker process runs one task at a time and stays up for the next (imports and process start
are paid once per worker, not per task).
"""

from __future__ import annotations

import multiprocessing
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Task:
    """One step: ``function(*args, inputs)``, where ``inputs`` maps each task of ``after`` to its
    result. ``function`` must be importable by name (a module-level function) to run in a worker."""

    name: str
    function: Callable[..., Any]
    args: tuple = ()
    after: tuple[str, ...] = ()
    cost: float = 1.0
    """Estimated CPU seconds: decides the order, nothing else."""


def ranks(tasks: Sequence[Task]) -> dict[str, float]:
    """Each task's upward rank: its cost plus the largest rank among the tasks that need it (the
    work on the longest chain from its start to the end)."""
    by_name = {task.name: task for task in tasks}
    if len(by_name) != len(tasks):
        raise ValueError(f"task names repeat: {sorted(n for n in by_name if sum(t.name == n for t in tasks) > 1)}")
    dependents: dict[str, list[str]] = defaultdict(list)
    for task in tasks:
        for needed in task.after:
            if needed not in by_name:
                raise ValueError(f"task {task.name!r} needs {needed!r}, which is not among the tasks")
            dependents[needed].append(task.name)
    memo: dict[str, float] = {}
    visiting: set[str] = set()

    def rank(name: str) -> float:
        if name not in memo:
            if name in visiting:
                raise ValueError(f"the tasks' dependencies form a cycle through {name!r}")
            visiting.add(name)
            memo[name] = by_name[name].cost + max((rank(d) for d in dependents[name]), default=0.0)
            visiting.discard(name)
        return memo[name]

    return {task.name: rank(task.name) for task in tasks}


def _ready(tasks: Sequence[Task], done: dict[str, Any], started: set[str], rank: dict[str, float]) -> list[Task]:
    """The tasks whose inputs are done and that have not started, highest rank first (ties: the
    order given)."""
    ready = [t for t in tasks if t.name not in started and all(d in done for d in t.after)]
    return sorted(ready, key=lambda t: -rank[t.name])


def serial_order(tasks: Sequence[Task]) -> list[str]:
    """The order one worker runs ``tasks`` in."""
    rank = ranks(tasks)
    done: dict[str, Any] = {}
    order: list[str] = []
    while len(order) < len(tasks):
        task = _ready(tasks, done, set(order), rank)[0]
        order.append(task.name)
        done[task.name] = None
    return order


def run_tasks(tasks: Sequence[Task], workers: int,
              on_done: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Run ``tasks`` (dependencies first, longest chain first), ``workers`` at a time in spawned
    worker processes, or one after another in this process when ``workers`` is 1; each task's
    result by name. ``on_done(name, result)`` is called in this process as each one finishes. A
    task that fails stops the run: no further task starts, and its error is raised once the tasks
    already running have finished."""
    rank = ranks(tasks)
    by_name = {task.name: task for task in tasks}
    results: dict[str, Any] = {}
    if workers <= 1 or len(tasks) <= 1:
        for name in serial_order(tasks):
            task = by_name[name]
            results[name] = task.function(*task.args, {d: results[d] for d in task.after})
            if on_done is not None:
                on_done(name, results[name])
        return results
    context = multiprocessing.get_context("spawn")         # never fork a process that has run torch
    started: set[str] = set()
    running: dict[Future, str] = {}
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context) as pool:
        while len(results) < len(tasks):
            for task in _ready(tasks, results, started, rank)[:workers - len(running)]:
                started.add(task.name)
                running[pool.submit(task.function, *task.args, {d: results[d] for d in task.after})] = task.name
            if not running:
                raise RuntimeError("no task can start: the dependencies are unsatisfiable")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                error = future.exception()
                if error is not None:
                    wait(running)
                    raise error
                results[name] = future.result()
                if on_done is not None:
                    on_done(name, results[name])
    return results
