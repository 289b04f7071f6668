"""meteor.demo.schedule: the demo's steps as a graph of tasks, the longest chain first, on worker
processes (spawned, as `meteor demo` runs them)."""

import time

import pytest

from meteor.demo.schedule import Task, ranks, run_tasks, serial_order


def record(name: str, inputs: dict) -> dict:
    """A task: its name, what it received, and when it ran."""
    return {"name": name, "inputs": sorted(inputs), "start": time.time(), "end": time.time()}


def nap(name: str, seconds: float, inputs: dict) -> dict:
    start = time.time()
    time.sleep(seconds)
    return {"name": name, "inputs": sorted(inputs), "start": start, "end": time.time()}


def fail(name: str, inputs: dict) -> None:
    raise ValueError(f"{name} failed on purpose")


def chains(costs: dict[str, tuple[float, float, float]], function=record) -> list[Task]:
    """The demo's shape: per budget, stage 1 -> stage 2 -> evaluation."""
    tasks = []
    for budget, (one, two, evaluation) in costs.items():
        tasks += [Task(f"{budget}/stage1", function, (f"{budget}/stage1",), cost=one),
                  Task(f"{budget}/stage2", function, (f"{budget}/stage2",), after=(f"{budget}/stage1",), cost=two),
                  Task(f"eval/{budget}", function, (f"eval/{budget}",), after=(f"{budget}/stage2",), cost=evaluation)]
    return tasks


def test_rank_is_the_work_on_the_longest_chain_from_a_task():
    tasks = chains({"all": (400, 200, 90), "k3": (140, 80, 40)})
    rank = ranks(tasks)
    assert rank["all/stage1"] == 690 and rank["all/stage2"] == 290 and rank["eval/all"] == 90
    assert rank["k3/stage1"] == 260
    # a task two others need ranks by the longer of them
    joined = tasks + [Task("figures", record, ("figures",), after=("all/stage2",), cost=500)]
    assert ranks(joined)["all/stage1"] == 400 + 200 + 500


def test_one_worker_runs_the_longest_chain_first_and_each_task_after_its_inputs():
    tasks = chains({"k16": (245, 100, 60), "all": (430, 200, 100), "k3": (146, 80, 40)})
    order = serial_order(tasks)
    assert order[0] == "all/stage1" and order.index("k16/stage1") < order.index("k3/stage1")
    for task in tasks:
        assert all(order.index(needed) < order.index(task.name) for needed in task.after)
    results = run_tasks(tasks, workers=1)
    assert set(results) == {task.name for task in tasks}
    assert results["eval/k3"]["inputs"] == ["k3/stage2"]          # each task gets its inputs' results


def test_two_worker_processes_keep_both_busy_and_respect_the_order():
    tasks = chains({"long": (1.2, 0.6, 0.2), "short": (0.3, 0.3, 0.1), "mid": (0.5, 0.4, 0.1)}, nap)
    tasks = [Task(t.name, nap, (t.name, t.cost), t.after, t.cost) for t in tasks]
    finished = []
    results = run_tasks(tasks, workers=2, on_done=lambda name, result: finished.append(name))
    assert sorted(finished) == sorted(results) == sorted(t.name for t in tasks)
    for task in tasks:
        for needed in task.after:
            assert results[needed]["end"] <= results[task.name]["start"]
    # the longest chain started first; at no moment did more than two tasks run
    assert min(results.values(), key=lambda r: r["start"])["name"] in {"long/stage1", "mid/stage1"}
    events = sorted([(r["start"], 1) for r in results.values()] + [(r["end"], -1) for r in results.values()])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most <= 2


def test_a_failing_task_stops_the_run_with_its_error():
    tasks = chains({"a": (1, 1, 1)}) + [Task("broken", fail, ("broken",), cost=10)]
    with pytest.raises(ValueError, match="broken failed on purpose"):
        run_tasks(tasks, workers=1)
    with pytest.raises(ValueError, match="broken failed on purpose"):
        run_tasks(tasks, workers=2)


def test_a_graph_that_cannot_run_is_refused_naming_the_task():
    with pytest.raises(ValueError, match="'b' needs 'missing'"):
        ranks([Task("b", record, ("b",), after=("missing",))])
    with pytest.raises(ValueError, match="cycle"):
        ranks([Task("a", record, ("a",), after=("b",)), Task("b", record, ("b",), after=("a",))])
    with pytest.raises(ValueError, match="repeat"):
        ranks([Task("a", record, ("a",)), Task("a", record, ("a",))])
